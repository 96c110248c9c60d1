//! A container image the shim tests build themselves, with no registry: an OCI
//! image-layout tarball for `ctr images import`, holding two uncompressed layers (and a
//! pause image for CRI's sandboxes: the same layers, `sleep` as its command; images of
//! many layers on top of the same two, [`layered_image_tar`]; and one with the host's
//! iptables on top, [`iptables_image_tar`]).
//!
//! - layer 1: Debian's busybox-static as `/bin/busybox`, a link in /bin for every applet
//!   it lists, the usual mount points, a minimal /etc/passwd and /etc/group;
//! - layer 2: one file, [`HELLO_PATH`], holding [`HELLO_CONTENT`].
//!
//! Entries carry mtime 0 and are written in a fixed order, so the digests are the same
//! from one build to the next.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::json;
use sha2::{Digest, Sha256};

use crate::layers::BUSYBOX;

/// The image's name, as containerd lists it after the import.
pub const IMAGE_REF: &str = "docker.io/peapod/busybox:test";
/// The file layer 2 adds, and what it holds.
pub const HELLO_PATH: &str = "/app/hello.txt";
pub const HELLO_CONTENT: &str = "hello from peapod's second layer\n";
/// The pause image's name (CRI's `sandbox_image`).
pub const PAUSE_IMAGE_REF: &str = "docker.io/peapod/pause:test";
/// The pause image's command: sleep until killed (CRI stops a sandbox with SIGKILL).
const PAUSE_CMD: [&str; 2] = ["sleep", "2147483647"];
/// The image config's environment.
pub const IMAGE_PATH_ENV: &str = "PATH=/bin:/usr/bin";

const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar";
const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
const INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";

/// Writes the image's OCI-layout tarball into `dir`; returns its path and the image's
/// name ([`IMAGE_REF`]).
pub fn busybox_image_tar(dir: &Path) -> (PathBuf, &'static str) {
    image_tar(dir, IMAGE_REF, &["sh"])
}

/// Writes the pause image's OCI-layout tarball into `dir`; returns its path and the
/// image's name ([`PAUSE_IMAGE_REF`]). Its layers are the busybox image's, so a node
/// (and peapod's layer cache) holds them once.
pub fn pause_image_tar(dir: &Path) -> (PathBuf, &'static str) {
    image_tar(dir, PAUSE_IMAGE_REF, &PAUSE_CMD)
}

/// The name of the image [`iptables_image_tar`] writes.
pub const IPTABLES_IMAGE_REF: &str = "docker.io/peapod/iptables:test";
/// The host's iptables programs the iptables image carries, in `/usr/bin` (each
/// multi-call binary picks its mode by the name it is run as); install them with
/// Debian's `iptables` package.
const XTABLES_PROGRAMS: [(&str, &str); 2] = [
    ("/usr/sbin/xtables-nft-multi", "iptables-nft"),
    ("/usr/sbin/xtables-legacy-multi", "iptables-legacy"),
];

/// Writes the OCI-layout tarball of the busybox image with a third layer holding the
/// host's `iptables-nft` and `iptables-legacy` (what a service mesh's init container
/// runs), their shared libraries and their extensions, into `dir`; returns its path
/// and name ([`IPTABLES_IMAGE_REF`]). Copied from the host's installed package, with
/// the library paths `ldd` names, so no registry or package download is involved.
pub fn iptables_image_tar(dir: &Path) -> (PathBuf, &'static str) {
    let layers = vec![busybox_layer(), app_layer(), iptables_layer()];
    image_tar_of(dir, IPTABLES_IMAGE_REF, &["sh"], layers)
}

fn iptables_layer() -> Vec<u8> {
    let mut files: BTreeMap<PathBuf, Vec<u8>> = BTreeMap::new();
    let mut read = |path: &Path, as_path: PathBuf| {
        let bytes = std::fs::read(path).unwrap_or_else(|e| {
            panic!(
                "reading {}: {e} (install Debian's iptables: .ci/install-deps.sh does)",
                path.display()
            )
        });
        files.insert(as_path, bytes);
    };
    let mut libraries = BTreeSet::new();
    for (program, name) in XTABLES_PROGRAMS {
        read(Path::new(program), Path::new("usr/bin").join(name));
        libraries.extend(shared_libraries(Path::new(program)));
    }
    // The extensions (targets, matches) are loaded from libxtables' directory.
    let xtables = libraries
        .iter()
        .find(|l| {
            l.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("libxtables.so"))
        })
        .and_then(|l| std::fs::canonicalize(l).ok())
        .and_then(|l| l.parent().map(|d| d.join("xtables")))
        .expect("iptables links libxtables");
    for entry in std::fs::read_dir(&xtables)
        .unwrap_or_else(|e| panic!("reading {}: {e}", xtables.display()))
        .flatten()
    {
        read(&entry.path(), relative(&entry.path()));
    }
    for library in &libraries {
        read(library, relative(library));
    }
    let mut dirs: BTreeSet<PathBuf> = files
        .keys()
        .flat_map(|f| f.ancestors().skip(1))
        .filter(|d| !d.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .collect();
    // iptables-legacy takes its lock in /run.
    dirs.insert("run".into());
    let mut t = TarWriter::new();
    for d in &dirs {
        t.dir(&d.to_string_lossy());
    }
    for (path, bytes) in &files {
        t.file(&path.to_string_lossy(), bytes, 0o755);
    }
    t.finish()
}

/// The shared libraries `ldd` says `program` loads, the dynamic loader included.
fn shared_libraries(program: &Path) -> Vec<PathBuf> {
    let out = Command::new("ldd")
        .arg(program)
        .output()
        .unwrap_or_else(|e| panic!("running ldd {}: {e}", program.display()));
    assert!(out.status.success(), "ldd {} failed", program.display());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
            // "/lib64/ld-linux-x86-64.so.2 (0x...)"; the vDSO has no path.
            let path = l.split("=>").last()?.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// `path` without its leading `/`, as a tar entry names it.
fn relative(path: &Path) -> PathBuf {
    path.strip_prefix("/").unwrap_or(path).to_path_buf()
}

/// The directory each layer of a [`layered_image_tar`] image above the first two adds
/// a file to.
pub const STACK_DIR: &str = "/stack";
/// Where a [`layered_image_tar`] image of 3 layers or more names itself.
pub const IMAGE_NAME_PATH: &str = "/etc/peapod-image";

/// Writes the OCI-layout tarball of an image of `layers` layers into `dir`: busybox
/// alone for 1, the busybox image's two for 2; beyond, those two, then `layers - 2`
/// that each add
/// `/stack/<i>` (holding `i`) and `/stack/tmp-<i>`, and delete the layer below's
/// `tmp-<i-1>` with a whiteout; the last also replaces [`HELLO_PATH`] with
/// `hello from layer <layers>` and writes [`IMAGE_NAME_PATH`] (the reference, so that
/// images of the same depth are different images). So a merged tree shows `layers - 2`
/// numbered files, one `tmp-` file, and the top layer's hello.
pub fn layered_image_tar(
    dir: &Path,
    reference: &'static str,
    layers: usize,
) -> (PathBuf, &'static str) {
    assert!(layers >= 1, "an image has a layer");
    let mut all = vec![busybox_layer(), app_layer()];
    all.truncate(layers);
    let stack = STACK_DIR.trim_start_matches('/');
    for i in 1..=layers.saturating_sub(2) {
        let mut t = TarWriter::new();
        t.dir(stack);
        t.file(&format!("{stack}/{i}"), i.to_string().as_bytes(), 0o644);
        t.file(&format!("{stack}/tmp-{i}"), b"", 0o644);
        if i > 1 {
            // An OCI whiteout: deletes tmp-<i-1> from the layers below.
            t.file(&format!("{stack}/.wh.tmp-{}", i - 1), b"", 0o644);
        }
        if i == layers - 2 {
            let hello = HELLO_PATH.trim_start_matches('/');
            t.file(
                hello,
                format!("hello from layer {layers}\n").as_bytes(),
                0o644,
            );
            t.file(
                IMAGE_NAME_PATH.trim_start_matches('/'),
                format!("{reference}\n").as_bytes(),
                0o644,
            );
        }
        all.push(t.finish());
    }
    image_tar_of(dir, reference, &["sh"], all)
}

/// Where a [`www_image_tar`] image keeps its files (busybox `httpd -h /www`).
pub const WWW_DIR: &str = "/www";

/// Writes the OCI-layout tarball of the busybox image with one more layer holding
/// `files` (name under [`WWW_DIR`], content) into `dir`; returns its path and
/// `reference`. Data made on the host: the guest's kernel, emulated on our hosts,
/// would take minutes to write them.
pub fn www_image_tar(
    dir: &Path,
    reference: &'static str,
    files: &[(&str, &[u8])],
) -> (PathBuf, &'static str) {
    let www = WWW_DIR.trim_start_matches('/');
    let mut t = TarWriter::new();
    t.dir(www);
    for (name, data) in files {
        t.file(&format!("{www}/{name}"), data, 0o644);
    }
    let layers = vec![busybox_layer(), app_layer(), t.finish()];
    image_tar_of(dir, reference, &["sh"], layers)
}

/// `n` bytes with no pattern a lost, repeated or reordered piece could hide in
/// (xorshift64*), the same for the same `seed`.
pub fn pseudo_random(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(n);
    out
}

/// The OCI-layout tarball of an image named `reference` with the two layers and `cmd`.
fn image_tar(dir: &Path, reference: &'static str, cmd: &[&str]) -> (PathBuf, &'static str) {
    image_tar_of(dir, reference, cmd, vec![busybox_layer(), app_layer()])
}

/// The OCI-layout tarball of an image named `reference` with `layers` (bottom first,
/// uncompressed tars) and `cmd`.
fn image_tar_of(
    dir: &Path,
    reference: &'static str,
    cmd: &[&str],
    layers: Vec<Vec<u8>>,
) -> (PathBuf, &'static str) {
    let history: Vec<serde_json::Value> = (0..layers.len())
        .map(|i| json!({ "created_by": format!("peapod-tests: layer {i}") }))
        .collect();
    let mut blobs: Vec<(String, Vec<u8>)> = Vec::new();
    let mut layer_descs = Vec::new();
    let mut diff_ids = Vec::new();
    for layer in layers {
        let digest = sha256(&layer);
        // Uncompressed: the diff id is the blob's digest.
        diff_ids.push(digest.clone());
        layer_descs.push(json!({
            "mediaType": LAYER_MEDIA_TYPE,
            "digest": digest,
            "size": layer.len(),
        }));
        blobs.push((digest, layer));
    }
    let config = serde_json::to_vec(&json!({
        "architecture": oci_arch(),
        "os": "linux",
        "config": {
            "Env": [IMAGE_PATH_ENV],
            "Cmd": cmd,
            "WorkingDir": "/",
        },
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
        "history": history,
    }))
    .unwrap();
    let config_digest = sha256(&config);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": {
            "mediaType": CONFIG_MEDIA_TYPE,
            "digest": config_digest,
            "size": config.len(),
        },
        "layers": layer_descs,
    }))
    .unwrap();
    let manifest_digest = sha256(&manifest);
    let (name, tag) = reference.rsplit_once(':').unwrap();
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": INDEX_MEDIA_TYPE,
        "manifests": [{
            "mediaType": MANIFEST_MEDIA_TYPE,
            "digest": manifest_digest,
            "size": manifest.len(),
            "annotations": {
                "io.containerd.image.name": reference,
                "org.opencontainers.image.ref.name": tag,
            },
        }],
    }))
    .unwrap();
    blobs.push((config_digest, config));
    blobs.push((manifest_digest, manifest));

    let mut out = TarWriter::new();
    out.file("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#, 0o644);
    out.file("index.json", &index, 0o644);
    out.dir("blobs");
    out.dir("blobs/sha256");
    for (digest, data) in &blobs {
        let hex = digest.strip_prefix("sha256:").unwrap();
        out.file(&format!("blobs/sha256/{hex}"), data, 0o644);
    }
    let file = name.rsplit('/').next().unwrap();
    let path = dir.join(format!("peapod-{file}-oci.tar"));
    std::fs::write(&path, out.finish())
        .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    (path, reference)
}

/// The OCI architecture name of this machine.
fn oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => panic!("no OCI architecture name known for {other}"),
    }
}

fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", sha256_hex(data))
}

/// The SHA-256 of `data`, in lower-case hex (as `sha256sum` prints it).
pub fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The applets the busybox binary lists (`busybox --list`).
fn applets() -> Vec<String> {
    let out = Command::new(BUSYBOX)
        .arg("--list")
        .output()
        .unwrap_or_else(|e| panic!("running {BUSYBOX} --list: {e} (install busybox-static)"));
    assert!(out.status.success(), "{BUSYBOX} --list failed");
    let mut list: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty() && l != "busybox" && !l.contains('/'))
        .collect();
    list.sort();
    list.dedup();
    list
}

fn busybox_layer() -> Vec<u8> {
    let busybox = Path::new(BUSYBOX);
    assert!(
        busybox.exists(),
        "{BUSYBOX} is missing: install busybox-static (.ci/install-deps.sh does)"
    );
    let bytes = std::fs::read(busybox).expect("reading /bin/busybox");
    let mut t = TarWriter::new();
    for d in ["bin", "dev", "etc", "proc", "root", "sys", "usr", "usr/bin"] {
        t.dir(d);
    }
    t.dir_mode("tmp", 0o1777);
    t.file("bin/busybox", &bytes, 0o755);
    for applet in applets() {
        t.symlink(&format!("bin/{applet}"), "busybox");
    }
    t.file(
        "etc/passwd",
        b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        0o644,
    );
    t.file("etc/group", b"root:x:0:\nnogroup:x:65534:\n", 0o644);
    t.finish()
}

fn app_layer() -> Vec<u8> {
    let mut t = TarWriter::new();
    let file = HELLO_PATH.trim_start_matches('/');
    let parent = Path::new(file).parent().unwrap().to_str().unwrap();
    t.dir(parent);
    t.file(file, HELLO_CONTENT.as_bytes(), 0o644);
    t.finish()
}

/// A tar archive in memory: root-owned entries, mtime 0.
struct TarWriter(tar::Builder<Vec<u8>>);

impl TarWriter {
    fn new() -> Self {
        let mut b = tar::Builder::new(Vec::new());
        b.mode(tar::HeaderMode::Deterministic);
        Self(b)
    }

    fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(size);
        h
    }

    fn dir(&mut self, path: &str) {
        self.dir_mode(path, 0o755);
    }

    fn dir_mode(&mut self, path: &str, mode: u32) {
        let mut h = Self::header(tar::EntryType::Directory, mode, 0);
        self.0
            .append_data(&mut h, format!("{path}/"), std::io::empty())
            .unwrap();
    }

    fn file(&mut self, path: &str, data: &[u8], mode: u32) {
        let mut h = Self::header(tar::EntryType::Regular, mode, data.len() as u64);
        self.0.append_data(&mut h, path, data).unwrap();
    }

    fn symlink(&mut self, path: &str, target: &str) {
        let mut h = Self::header(tar::EntryType::Symlink, 0o777, 0);
        self.0.append_link(&mut h, path, target).unwrap();
    }

    fn finish(self) -> Vec<u8> {
        self.0.into_inner().unwrap()
    }
}
