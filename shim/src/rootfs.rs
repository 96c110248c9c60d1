//! containerd's rootfs mounts turned into block-device images for the VM.
//!
//! containerd hands the shim the container's snapshot as mounts
//! (`CreateTaskRequest.rootfs`). Two shapes are handled:
//!
//! * the overlayfs snapshotter's one `overlay` mount, `lowerdir=L1:L2:...` (L1 the
//!   topmost layer), `upperdir=U`, `workdir=W` and options peapod does not need
//!   (`index=off`, `userxattr`...), which are ignored. Every lower directory is a
//!   committed snapshot, immutable: the whole chain of them becomes ONE read-only
//!   image of the merged tree, once per node, kept in a [`LayerCache`] shared by every
//!   pod and every shim process. One disk per image, whatever its number of layers,
//!   and every pod of an image reads the same file (one copy in the host's page
//!   cache); the price is disk space for bases that several images share
//!   (docs/decisions.md). A non-empty upperdir becomes one more, uncached, image on
//!   top.
//! * the native snapshotter's (or an image without layers') one `bind` mount of a
//!   directory: a mutable, per-container tree, imaged uncached into the container's
//!   work directory.
//!
//! Images are EROFS (`mkfs.erofs`, erofs-utils) where it is installed, else ext4
//! (`mkfs.ext4 -d`, e2fsprogs). The guest stacks them with overlayfs under a fresh
//! writable ext4 disk ([`PreparedRootfs::upper`]).
//!
//! Writes the container makes in the VM land in that upper disk only, a sparse file
//! on the node's disk. With an overlay snapshot the disk is a file in the snapshot's
//! upperdir ([`UPPER_IN_SNAPSHOT`]), because containerd's CRI takes a container's
//! writable-layer usage (what the kubelet's ephemeral-storage eviction reads) from the
//! snapshotter, which counts the allocated blocks under the upperdir
//! (docs/decisions.md). Otherwise it is in the container's work directory, under
//! `data_dir`. The files the container writes are inside the disk, so
//! `ctr snapshot` / `nerdctl commit` of a peapod container see one opaque file.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use sha2::{Digest, Sha256};

/// The upper disk's name in an overlay snapshot's upperdir: hidden, and named for
/// whoever finds it there.
pub const UPPER_IN_SNAPSHOT: &str = ".peapod-upper.ext4";
/// The upper disk's name in the container's work directory.
const UPPER_IN_WORK_DIR: &str = "upper.ext4";

/// One of containerd's rootfs mounts (`containerd.types.Mount`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootfsMount {
    /// `type`: "overlay", "bind"...
    pub kind: String,
    pub source: String,
    pub options: Vec<String>,
}

/// A read-only filesystem image of one layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerImage {
    pub path: PathBuf,
    /// "erofs" or "ext4", as the guest agent's `Disk.fstype` wants it.
    pub fstype: &'static str,
    /// In the node's [`LayerCache`] (shared: never delete it), or the container's own
    /// (in its work directory, deleted with it).
    pub cached: bool,
}

/// What the guest needs for a container's rootfs.
#[derive(Debug)]
pub struct PreparedRootfs {
    /// Read-only layers, topmost first, as the guest agent's `Rootfs.layers` wants.
    pub layers: Vec<LayerImage>,
    /// A fresh, empty, sparse ext4 image for the container's writes.
    pub upper: PathBuf,
    /// Leases on the cached layers: hold them while the container uses them.
    pub leases: Vec<ImageLease>,
}

/// The `overlay` mount's options that matter, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlayOptions {
    /// Topmost first, as in `lowerdir=`.
    pub lowerdirs: Vec<PathBuf>,
    pub upperdir: Option<PathBuf>,
    pub workdir: Option<PathBuf>,
}

/// Why a rootfs could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error(
        "containerd passed no rootfs mounts; peapod needs the container's snapshot as one \
         overlay or bind mount (use the overlayfs or native snapshotter)"
    )]
    NoMounts,
    #[error(
        "containerd passed {count} rootfs mounts ({list}); peapod handles exactly one \
         overlay or bind mount (use the overlayfs or native snapshotter)"
    )]
    SeveralMounts { count: usize, list: String },
    #[error(
        "containerd passed {kind} mount for {mount_source}; peapod handles overlay and bind \
         (native snapshotter): configure the runtime's snapshotter as overlayfs or native"
    )]
    UnsupportedMount { kind: String, mount_source: String },
    #[error(
        "overlay mount {mount_source}: no lowerdir= in its options ({options}); peapod needs the \
         snapshot's layers as lowerdir=L1:L2:..."
    )]
    MissingLowerdir {
        mount_source: String,
        options: String,
    },
    #[error(
        "cannot run {program} to turn {dir} into an image: it is not installed (install \
         erofs-utils or e2fsprogs)"
    )]
    MkfsMissing { program: String, dir: PathBuf },
    #[error("{program} failed to turn {dir} into {image} ({status}): {stderr}")]
    MkfsFailed {
        program: String,
        dir: PathBuf,
        image: PathBuf,
        status: String,
        stderr: String,
    },
    #[error(
        "cannot merge the image's {layers} layers (under {}) into one image: {cause}{hint}",
        base.display()
    )]
    Merge {
        layers: usize,
        base: PathBuf,
        cause: String,
        /// What to do, starting with "; ", or empty.
        hint: String,
    },
    #[error("{what} {}: {source}{hint}", path.display())]
    Io {
        what: String,
        path: PathBuf,
        source: io::Error,
        /// What to do, starting with "; ", or empty.
        hint: String,
    },
}

fn io_error(what: &str, path: &Path, source: io::Error) -> RootfsError {
    let hint = match source.kind() {
        io::ErrorKind::NotFound => "; is the snapshot still there (was the container removed?)",
        io::ErrorKind::PermissionDenied => "; the shim runs as root to read every layer",
        _ => "",
    };
    RootfsError::Io {
        what: what.to_string(),
        path: path.to_path_buf(),
        source,
        hint: hint.to_string(),
    }
}

/// The programs that make images.
#[derive(Debug, Clone)]
pub struct MkfsTools {
    /// `None`: never EROFS.
    pub erofs: Option<PathBuf>,
    pub ext4: PathBuf,
}

impl Default for MkfsTools {
    fn default() -> Self {
        MkfsTools {
            erofs: Some("mkfs.erofs".into()),
            ext4: "mkfs.ext4".into(),
        }
    }
}

/// The node's cache of layer images, keyed by each snapshot directory's identity.
/// Safe to share among threads and shim processes: a key is built under an exclusive
/// `flock` of its lock file, into a temporary file renamed into place.
#[derive(Debug)]
pub struct LayerCache {
    dir: PathBuf,
    tools: MkfsTools,
    /// Whether the EROFS program runs, found out once.
    erofs: OnceLock<bool>,
    /// Images this cache built (not found), for tests.
    builds: AtomicU64,
}

/// A shared lock on a cached image's lock file: while one is held (by any process),
/// [`LayerCache::collect`] leaves the image alone. Released on drop.
#[derive(Debug)]
pub struct ImageLease {
    _lock: File,
}

/// What a [`LayerCache::collect`] did.
#[derive(Debug, Default)]
pub struct Collection {
    /// The images it removed.
    pub removed: Vec<PathBuf>,
    /// The bytes of the images left.
    pub kept_bytes: u64,
}

/// The extension of the file beside each image that lists its layer directories, so
/// that a collection can tell whether containerd still has them.
const LAYERS_EXT: &str = "layers";

/// Writes the list of an image's layer directories (JSON: an array of paths).
fn write_layer_list(path: &Path, dirs: &[PathBuf]) -> Result<(), RootfsError> {
    let text = serde_json::to_vec(dirs).expect("paths serialise");
    std::fs::write(path, text).map_err(|e| io_error("writing the layer list", path, e))
}

/// The layer directories listed at `path`; `None` if there is no readable list.
fn read_layer_list(path: &Path) -> Option<Vec<PathBuf>> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// Bumped when the images' format or the key's makeup change, so that old images are
/// not taken for new ones. v2: an image holds a whole chain of layers, merged.
const KEY_VERSION: &str = "peapod-layer-v2";

impl LayerCache {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self::with_tools(dir, MkfsTools::default())
    }

    pub fn with_tools(dir: impl Into<PathBuf>, tools: MkfsTools) -> Self {
        LayerCache {
            dir: dir.into(),
            tools,
            erofs: OnceLock::new(),
            builds: AtomicU64::new(0),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The image of committed snapshot `snapshot_dir` alone, built now if the cache
    /// lacks it. Blocking.
    pub fn layer(&self, snapshot_dir: &Path) -> Result<LayerImage, RootfsError> {
        self.chain(&[snapshot_dir.to_path_buf()])
    }

    /// One image of the tree that committed snapshots `lowerdirs` (topmost first, as in
    /// `lowerdir=`) make when stacked, built now if the cache lacks it: later layers'
    /// whiteouts and opaque directories are applied, so the image has neither.
    /// Blocking.
    pub fn chain(&self, lowerdirs: &[PathBuf]) -> Result<LayerImage, RootfsError> {
        self.lease(lowerdirs).map(|(image, _)| image)
    }

    /// [`LayerCache::chain`], with a lease that keeps [`LayerCache::collect`] from
    /// removing the image while it is held (a pod holds it while the image is
    /// attached). Marks the image used now, for the collection's least-recently-used
    /// order.
    pub fn lease(&self, lowerdirs: &[PathBuf]) -> Result<(LayerImage, ImageLease), RootfsError> {
        let key = chain_key(lowerdirs)?;
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| io_error("creating the layer cache", &self.dir, e))?;
        let found = |key: &str| {
            ["erofs", "ext4"].into_iter().find_map(|fstype| {
                let path = self.dir.join(format!("{key}.{fstype}"));
                path.is_file().then_some(LayerImage {
                    path,
                    fstype,
                    cached: true,
                })
            })
        };
        // A collection removes an image under the exclusive lock: a shared lock taken
        // while the image is there keeps it there.
        loop {
            let shared = self.lock(&key, libc::LOCK_SH)?;
            if let Some(image) = found(&key) {
                self.mark_used(&key);
                return Ok((image, ImageLease { _lock: shared }));
            }
            drop(shared);
            let lock = self.lock(&key, libc::LOCK_EX)?;
            // Another process may have built it while this one waited.
            if found(&key).is_none() {
                self.build_key(&key, lowerdirs)?;
            }
            // Downgrading is not atomic: a collection may slip in; then go again.
            flock(&lock, libc::LOCK_SH).map_err(|e| io_error("locking", &self.dir, e))?;
            if self.still_linked(&lock, &key) {
                if let Some(image) = found(&key) {
                    self.mark_used(&key);
                    return Ok((image, ImageLease { _lock: lock }));
                }
            }
        }
    }

    /// Builds `key`'s image of `lowerdirs`, with its list of layers beside it; the
    /// caller holds the key's exclusive lock.
    fn build_key(&self, key: &str, lowerdirs: &[PathBuf]) -> Result<(), RootfsError> {
        // Under the lock no one else builds this key: a temporary file of it is a
        // crashed builder's.
        remove_leftovers(&self.dir, &format!("{key}.tmp-"));
        let fstype = self.fstype();
        let tmp = self.dir.join(format!(
            "{key}.tmp-{}-{}.{fstype}",
            std::process::id(),
            unique()
        ));
        // The list first: an image is never there without it.
        let list = self.dir.join(format!("{key}.{LAYERS_EXT}"));
        let built = write_layer_list(&list, lowerdirs)
            .and_then(|()| match lowerdirs {
                [one] => self.build(one, &tmp, fstype),
                several => self.build_merged(several, &tmp, fstype),
            })
            .and_then(|()| sync_file(&tmp))
            .and_then(|()| {
                let path = self.dir.join(format!("{key}.{fstype}"));
                std::fs::rename(&tmp, &path)
                    .map_err(|e| io_error("renaming the new image into", &path, e))?;
                sync_dir(&self.dir);
                Ok(())
            });
        match built {
            Ok(()) => {
                self.builds.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                let _ = std::fs::remove_file(&list);
                Err(e)
            }
        }
    }

    /// The key's lock file, open and locked (`LOCK_SH` or `LOCK_EX`, waiting). A
    /// collection deletes the lock file of an image it removes; a lock taken on a file
    /// deleted meanwhile protects nothing, so it is taken again on the new one.
    fn lock(&self, key: &str, how: libc::c_int) -> Result<File, RootfsError> {
        loop {
            if let Some(lock) = self.lock_once(key, how)? {
                return Ok(lock);
            }
        }
    }

    /// Opens the key's lock file and takes `how` on it; `None` if the file was deleted
    /// (by a collection) meanwhile, when the lock protects nothing.
    fn lock_once(&self, key: &str, how: libc::c_int) -> Result<Option<File>, RootfsError> {
        let path = self.dir.join(format!("{key}.lock"));
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| io_error("opening the layer cache's lock", &path, e))?;
        flock(&lock, how).map_err(|e| io_error("locking", &path, e))?;
        Ok(self.still_linked(&lock, key).then_some(lock))
    }

    /// Whether `lock` is still the key's lock file (not deleted by a collection).
    fn still_linked(&self, lock: &File, key: &str) -> bool {
        let path = self.dir.join(format!("{key}.lock"));
        match (lock.metadata(), std::fs::metadata(path)) {
            (Ok(held), Ok(named)) => held.ino() == named.ino() && held.dev() == named.dev(),
            _ => false,
        }
    }

    /// Marks the key's image used now (its layer list's mtime); best effort.
    fn mark_used(&self, key: &str) {
        let list = self.dir.join(format!("{key}.{LAYERS_EXT}"));
        if let Ok(f) = File::options().write(true).open(list) {
            let _ = f.set_modified(std::time::SystemTime::now());
        }
    }

    /// Removes the images no pod holds a lease on whose layers containerd no longer
    /// has (a layer directory gone or changed, or no layer list), then, while the
    /// cache holds more than `bound` bytes, the least recently used of the rest that
    /// no pod holds. Images in use are never removed. Blocking; errors on single files
    /// are skipped (the next collection tries again).
    pub fn collect(&self, bound: Option<u64>) -> Collection {
        let mut report = Collection::default();
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return report;
        };
        // (last used, bytes, key, image path, its exclusive lock)
        let mut idle: Vec<(std::time::SystemTime, u64, String, PathBuf, File)> = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(key) = name
                .strip_suffix(".erofs")
                .or_else(|| name.strip_suffix(".ext4"))
                .filter(|k| !k.contains(".tmp-"))
            else {
                continue;
            };
            let bytes = entry.metadata().map_or(0, |m| m.len());
            report.kept_bytes += bytes;
            let path = entry.path();
            // In use (a lease) or being built: leave it.
            let Ok(Some(lock)) = self.lock_once(key, libc::LOCK_EX | libc::LOCK_NB) else {
                continue;
            };
            let list = self.dir.join(format!("{key}.{LAYERS_EXT}"));
            let current = read_layer_list(&list)
                .and_then(|dirs| chain_key(&dirs).ok())
                .is_some_and(|k| k == key);
            if !current {
                self.remove_image(key, &path, &mut report, bytes);
                continue;
            }
            let used = std::fs::metadata(&list)
                .and_then(|m| m.modified())
                .unwrap_or(std::time::UNIX_EPOCH);
            idle.push((used, bytes, key.to_string(), path, lock));
        }
        if let Some(bound) = bound {
            idle.sort_by_key(|i| i.0);
            for (_, bytes, key, path, _lock) in idle {
                if report.kept_bytes <= bound {
                    break;
                }
                self.remove_image(&key, &path, &mut report, bytes);
            }
        }
        report
    }

    /// Removes an image, its layer list and its lock file; the caller holds the lock.
    fn remove_image(&self, key: &str, image: &Path, report: &mut Collection, bytes: u64) {
        if std::fs::remove_file(image).is_err() {
            return;
        }
        report.kept_bytes -= bytes;
        report.removed.push(image.to_path_buf());
        let _ = std::fs::remove_file(self.dir.join(format!("{key}.{LAYERS_EXT}")));
        let _ = std::fs::remove_file(self.dir.join(format!("{key}.lock")));
    }

    /// "erofs" if its program runs, else "ext4".
    fn fstype(&self) -> &'static str {
        let erofs = *self.erofs.get_or_init(|| {
            self.tools
                .erofs
                .as_ref()
                .is_some_and(|p| Command::new(p).arg("--help").output().is_ok())
        });
        if erofs {
            "erofs"
        } else {
            "ext4"
        }
    }

    /// Builds an image of `dir` at `image` (replacing any file there).
    fn build(&self, dir: &Path, image: &Path, fstype: &'static str) -> Result<(), RootfsError> {
        match (fstype, &self.tools.erofs) {
            ("erofs", Some(program)) => build_erofs(program, dir, image),
            _ => build_ext4(&self.tools.ext4, dir, image),
        }
    }

    /// Builds the image of the stacked `lowerdirs` at `image`: the mkfs program reads
    /// a read-only overlay of them, mounted in a mount namespace of its own, so the
    /// mount ends with the program whatever happens to the shim.
    fn build_merged(
        &self,
        lowerdirs: &[PathBuf],
        image: &Path,
        fstype: &'static str,
    ) -> Result<(), RootfsError> {
        // The program runs in the layers' common directory: absolute paths only.
        let image = &std::path::absolute(image)
            .map_err(|e| io_error("resolving the image's path", image, e))?;
        let mountpoint = image.with_extension("mnt");
        std::fs::create_dir(&mountpoint)
            .map_err(|e| io_error("creating a mount point", &mountpoint, e))?;
        let merged = MergedLayers::new(lowerdirs, &mountpoint).and_then(|merged| {
            match (fstype, &self.tools.erofs) {
                ("erofs", Some(program)) => {
                    build_erofs_with(program, &mountpoint, image, |c| merged.mount_before_exec(c))
                }
                _ => {
                    // mkfs.ext4 -d sizes from the tree; the layers' sum bounds the
                    // merged tree's size from above.
                    let mut usage = Usage {
                        bytes: 0,
                        entries: 0,
                    };
                    for dir in lowerdirs {
                        let u = tree_usage(dir)?;
                        usage.bytes += u.bytes;
                        usage.entries += u.entries;
                    }
                    build_ext4_with(&self.tools.ext4, &mountpoint, image, usage, |c| {
                        merged.mount_before_exec(c)
                    })
                }
            }
            .map_err(|e| merged.explain(e))
        });
        let _ = std::fs::remove_dir(&mountpoint);
        merged
    }

    /// An uncached image of `dir` at `stem` plus the fstype's extension.
    fn image_of(&self, dir: &Path, stem: &Path) -> Result<LayerImage, RootfsError> {
        let fstype = self.fstype();
        let path = stem.with_extension(fstype);
        self.build(dir, &path, fstype)?;
        Ok(LayerImage {
            path,
            fstype,
            cached: false,
        })
    }

    #[cfg(test)]
    fn builds(&self) -> u64 {
        self.builds.load(Ordering::Relaxed)
    }
}

/// The cache key of a chain of snapshot directories: a hash of each one's identity
/// (its canonical path, device, inode and change time), in order, so that a path
/// reused for new content (a new inode, or new entries changing the ctime) never finds
/// the old image, and two images sharing some layers get images of their own.
fn chain_key(dirs: &[PathBuf]) -> Result<String, RootfsError> {
    let mut hash = Sha256::new();
    hash.update(KEY_VERSION.as_bytes());
    for dir in dirs {
        hash.update([0]);
        layer_identity(dir, &mut hash)?;
    }
    Ok(hash.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

fn layer_identity(dir: &Path, hash: &mut Sha256) -> Result<(), RootfsError> {
    let canonical = dir
        .canonicalize()
        .map_err(|e| io_error("reading layer directory", dir, e))?;
    let meta =
        std::fs::metadata(&canonical).map_err(|e| io_error("reading layer directory", dir, e))?;
    if !meta.is_dir() {
        return Err(RootfsError::Io {
            what: "reading layer directory".to_string(),
            path: dir.to_path_buf(),
            source: io::Error::from_raw_os_error(libc::ENOTDIR),
            hint: "; a snapshot's layer is a directory".to_string(),
        });
    }
    hash.update(canonical.as_os_str().as_encoded_bytes());
    hash.update([0]);
    for n in [
        meta.dev(),
        meta.ino(),
        meta.ctime() as u64,
        meta.ctime_nsec() as u64,
    ] {
        hash.update(n.to_le_bytes());
    }
    Ok(())
}

/// Removes the files of `dir` whose names start with `prefix`; best effort.
fn remove_leftovers(dir: &Path, prefix: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry
            .file_name()
            .as_encoded_bytes()
            .starts_with(prefix.as_bytes())
        {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

fn unique() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// flock(2) `how` on `f`, again after a signal.
fn flock(f: &File, how: libc::c_int) -> io::Result<()> {
    loop {
        // SAFETY: flock(2) on a descriptor we own; it may block, touching no memory.
        if unsafe { libc::flock(f.as_raw_fd(), how) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn sync_file(path: &Path) -> Result<(), RootfsError> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| io_error("syncing the new image", path, e))
}

/// Makes a rename in `dir` durable; best effort (a lost rename only rebuilds).
fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Runs an mkfs program; `dir` is what it images, for errors.
fn run_mkfs(cmd: &mut Command, dir: &Path, image: &Path) -> Result<(), RootfsError> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let out = cmd.output().map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            RootfsError::MkfsMissing {
                program: program.clone(),
                dir: dir.to_path_buf(),
            }
        } else {
            io_error(&format!("running {program} for"), dir, e)
        }
    })?;
    if out.status.success() {
        return Ok(());
    }
    let mut stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if stderr.is_empty() {
        stderr = String::from_utf8_lossy(&out.stdout).trim().to_string();
    }
    Err(RootfsError::MkfsFailed {
        program,
        dir: dir.to_path_buf(),
        image: image.to_path_buf(),
        status: out.status.to_string(),
        stderr,
    })
}

/// An EROFS image of `dir`, uncompressed, keeping owners, modes, mtimes, device
/// nodes (overlayfs whiteouts) and xattrs (opaque directories).
///
/// Unlike the test fixtures (tests/src/layers.rs), no `--all-root`: a container's
/// files keep their owners. Tail data stays inline (no `-Enoinline_data`): the guest
/// reads the image through an ordinary block device, where inline data only saves
/// space; it matters for DAX or fscache-backed mounts, which peapod does not use.
pub fn build_erofs(program: &Path, dir: &Path, image: &Path) -> Result<(), RootfsError> {
    build_erofs_with(program, dir, image, |_| {})
}

/// [`build_erofs`], with `hook` applied to the mkfs command before it runs.
fn build_erofs_with(
    program: &Path,
    dir: &Path,
    image: &Path,
    hook: impl FnOnce(&mut Command),
) -> Result<(), RootfsError> {
    remove_if_there(image)?;
    let mut cmd = Command::new(program);
    cmd.args(["--quiet", "--preserve-mtime"])
        .arg(image)
        .arg(dir);
    hook(&mut cmd);
    run_mkfs(&mut cmd, dir, image).inspect_err(|_| {
        let _ = std::fs::remove_file(image);
    })?;
    // A block device holds whole sectors; EROFS images are whole blocks already, but
    // make sure.
    let padded = File::options()
        .write(true)
        .open(image)
        .and_then(|f| {
            let len = f.metadata()?.len();
            let padded = len.div_ceil(4096) * 4096;
            if padded != len {
                f.set_len(padded)?;
            }
            Ok(())
        })
        .map_err(|e| io_error("padding the image", image, e));
    if padded.is_err() {
        let _ = std::fs::remove_file(image);
    }
    padded
}

/// An ext4 image of `dir` (`mkfs.ext4 -d`), sized from the tree with room for its
/// metadata, without a journal (it is read-only in the guest).
pub fn build_ext4(program: &Path, dir: &Path, image: &Path) -> Result<(), RootfsError> {
    build_ext4_with(program, dir, image, tree_usage(dir)?, |_| {})
}

/// [`build_ext4`] of a tree of `usage` (or less), with `hook` applied to the mkfs
/// command before it runs.
fn build_ext4_with(
    program: &Path,
    dir: &Path,
    image: &Path,
    usage: Usage,
    hook: impl FnOnce(&mut Command),
) -> Result<(), RootfsError> {
    remove_if_there(image)?;
    // Every entry gets its block and a 256-byte inode; then the superblock, group
    // descriptors, bitmaps and a margin of an eighth.
    let inodes = usage.entries + 64;
    let bytes = usage.bytes + inodes * 256 + (4 << 20);
    let size = (bytes + bytes / 8).div_ceil(1 << 20) << 20;
    let made = File::create(image)
        .and_then(|f| f.set_len(size))
        .map_err(|e| io_error("creating the image", image, e));
    let result = made.and_then(|()| {
        let mut cmd = Command::new(program);
        cmd.args([
            "-q", "-F", "-t", "ext4", "-b", "4096", "-m", "0", "-I", "256",
        ])
        .args(["-O", "^has_journal", "-N", &inodes.to_string()])
        .args(["-E", "lazy_itable_init=1,nodiscard", "-d"])
        .arg(dir)
        .arg(image);
        hook(&mut cmd);
        run_mkfs(&mut cmd, dir, image)
    });
    if result.is_err() {
        let _ = std::fs::remove_file(image);
    }
    result
}

/// A fresh sparse ext4 image of `bytes` for the container's writes. Lazy inode-table
/// and journal initialisation keep mkfs fast whatever the size: it writes only the
/// metadata it must. Its discard of the file (a hole punched in a hole) lets mkfs mark
/// the inode tables zeroed, which a sparse file's are: otherwise the guest kernel
/// zeroes them after mounting (ext4lazyinit), 160 MiB of writes to a 10 GiB disk that
/// the node would pay for and count against the container's writable layer.
pub fn build_upper(program: &Path, image: &Path, bytes: u64) -> Result<(), RootfsError> {
    remove_if_there(image)?;
    let made = File::create(image)
        .and_then(|f| f.set_len(bytes))
        .map_err(|e| io_error("creating the upper disk", image, e));
    let result = made.and_then(|()| {
        run_mkfs(
            Command::new(program)
                .args(["-q", "-F", "-t", "ext4", "-b", "4096", "-m", "0"])
                .args(["-E", "lazy_itable_init=1,lazy_journal_init=1"])
                .arg(image),
            image,
            image,
        )
    });
    if result.is_err() {
        let _ = std::fs::remove_file(image);
    }
    result
}

/// The most layers the kernel's overlayfs stacks (`OVL_MAX_STACK`).
const OVERLAY_MAX_LAYERS: usize = 500;
/// The most bytes of options a mount takes: one page, its last byte a NUL.
const MOUNT_OPTIONS_MAX: usize = 4095;

/// A read-only overlay of committed snapshots for an mkfs program to read, mounted in
/// the program's own mount namespace just before it runs: the mount is never seen on
/// the host and ends with the program.
struct MergedLayers {
    layers: usize,
    /// The lower directories' deepest common ancestor. The mount runs there, with the
    /// directories named relative to it, so that the options fit a page however many
    /// layers there are (containerd mounts its snapshots the same way).
    base: PathBuf,
    base_c: CString,
    target: CString,
    options: CString,
}

impl MergedLayers {
    fn new(lowerdirs: &[PathBuf], mountpoint: &Path) -> Result<Self, RootfsError> {
        let mut dirs = Vec::with_capacity(lowerdirs.len());
        for dir in lowerdirs {
            dirs.push(
                dir.canonicalize()
                    .map_err(|e| io_error("reading layer directory", dir, e))?,
            );
        }
        let mut base = dirs[0].clone();
        while !dirs.iter().all(|d| d.starts_with(&base)) {
            base.pop();
        }
        let merge_error = |cause: String, hint: &str| RootfsError::Merge {
            layers: lowerdirs.len(),
            base: base.clone(),
            cause,
            hint: hint.to_string(),
        };
        if dirs.len() > OVERLAY_MAX_LAYERS {
            return Err(merge_error(
                format!("the kernel's overlayfs stacks at most {OVERLAY_MAX_LAYERS} layers"),
                "; squash the image's layers (e.g. a multi-stage build that copies the \
                 result into one layer)",
            ));
        }
        let mut relative = Vec::with_capacity(dirs.len());
        for dir in &dirs {
            let rel = dir.strip_prefix(&base).unwrap_or(dir);
            let rel = if rel.as_os_str().is_empty() {
                "."
            } else {
                rel.to_str().unwrap_or("\u{fffd}")
            };
            if rel.contains([':', ',', '\\', '\u{fffd}']) {
                return Err(merge_error(
                    format!("layer directory {} has a ':', ',', '\\' or a byte that is not UTF-8 in its path, which a mount's lowerdir= cannot carry", dir.display()),
                    "; keep the snapshotter's root under a plain path",
                ));
            }
            relative.push(rel);
        }
        let options = format!("lowerdir={}", relative.join(":"));
        if options.len() > MOUNT_OPTIONS_MAX {
            return Err(merge_error(
                format!(
                    "their paths take {} bytes as mount options, more than the {MOUNT_OPTIONS_MAX} a mount takes",
                    options.len()
                ),
                "; squash the image's layers, or keep the snapshotter's root under a \
                 shorter path",
            ));
        }
        let c = |p: &Path| {
            CString::new(p.as_os_str().as_encoded_bytes())
                .map_err(|_| merge_error(format!("path {} holds a NUL byte", p.display()), ""))
        };
        let target = std::path::absolute(mountpoint)
            .map_err(|e| io_error("resolving the mount point", mountpoint, e))?;
        Ok(MergedLayers {
            layers: dirs.len(),
            base_c: c(&base)?,
            target: c(&target)?,
            options: CString::new(options).expect("checked: no NUL"),
            base,
        })
    }

    /// Makes `cmd` mount the overlay in a mount namespace of its own before its exec.
    fn mount_before_exec(&self, cmd: &mut Command) {
        let (base, target, options) = (
            self.base_c.clone(),
            self.target.clone(),
            self.options.clone(),
        );
        let hook = move || -> io::Result<()> {
            let check = |r: libc::c_int| {
                if r == 0 {
                    Ok(())
                } else {
                    Err(io::Error::last_os_error())
                }
            };
            // SAFETY: between fork and exec: only system calls, on NUL-terminated
            // strings built before the fork, which outlive the calls; no allocation,
            // no lock.
            unsafe {
                check(libc::unshare(libc::CLONE_NEWNS))?;
                check(libc::mount(
                    c"none".as_ptr(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ))?;
                check(libc::chdir(base.as_ptr()))?;
                check(libc::mount(
                    c"overlay".as_ptr(),
                    target.as_ptr(),
                    c"overlay".as_ptr(),
                    libc::MS_RDONLY,
                    options.as_ptr().cast(),
                ))
            }
        };
        // SAFETY: the hook runs in the child between fork and exec and does only
        // async-signal-safe system calls (see above).
        unsafe {
            cmd.pre_exec(hook);
        }
    }

    /// A failure to start the mkfs program is the mount's (the program itself was
    /// found): said as such.
    fn explain(&self, e: RootfsError) -> RootfsError {
        match e {
            RootfsError::Io { what, source, .. } if what.starts_with("running ") => {
                let hint = match source.raw_os_error() {
                    Some(libc::EPERM) => "; the shim needs CAP_SYS_ADMIN (it runs as root)",
                    Some(libc::ENODEV) => "; the node's kernel needs overlayfs (modprobe overlay)",
                    _ => "",
                };
                RootfsError::Merge {
                    layers: self.layers,
                    base: self.base.clone(),
                    cause: format!("mounting them as one read-only overlay: {source}"),
                    hint: hint.to_string(),
                }
            }
            other => other,
        }
    }
}

fn remove_if_there(path: &Path) -> Result<(), RootfsError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(io_error("removing an old image", path, e))
        }
        _ => Ok(()),
    }
}

struct Usage {
    /// Bytes in 4 KiB blocks, with a block per entry for its inode's extras (xattrs,
    /// long symlinks) and its directory entry.
    bytes: u64,
    entries: u64,
}

fn tree_usage(dir: &Path) -> Result<Usage, RootfsError> {
    let mut usage = Usage {
        bytes: 0,
        entries: 0,
    };
    let mut stack = vec![dir.to_path_buf()];
    while let Some(path) = stack.pop() {
        let meta = std::fs::symlink_metadata(&path)
            .map_err(|e| io_error("reading layer directory", &path, e))?;
        usage.entries += 1;
        usage.bytes += 4096 + meta.len().div_ceil(4096) * 4096;
        if meta.is_dir() {
            for entry in std::fs::read_dir(&path)
                .map_err(|e| io_error("reading layer directory", &path, e))?
            {
                let entry = entry.map_err(|e| io_error("reading layer directory", &path, e))?;
                stack.push(entry.path());
            }
        }
    }
    Ok(usage)
}

/// Parses an overlay mount's options; unknown ones (`index=off`, `userxattr`...) are
/// ignored.
pub fn parse_overlay_options(options: &[String]) -> OverlayOptions {
    let mut parsed = OverlayOptions {
        lowerdirs: Vec::new(),
        upperdir: None,
        workdir: None,
    };
    for option in options {
        if let Some(list) = option.strip_prefix("lowerdir=") {
            parsed.lowerdirs = list
                .split(':')
                .filter(|d| !d.is_empty())
                .map(PathBuf::from)
                .collect();
        } else if let Some(dir) = option.strip_prefix("upperdir=") {
            parsed.upperdir = Some(dir.into());
        } else if let Some(dir) = option.strip_prefix("workdir=") {
            parsed.workdir = Some(dir.into());
        }
    }
    parsed
}

/// What `prepare` made in the work directory, removed unless disarmed.
struct Undo {
    files: Vec<PathBuf>,
    dir: Option<PathBuf>,
}

impl Drop for Undo {
    fn drop(&mut self) {
        for f in &self.files {
            let _ = std::fs::remove_file(f);
        }
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// Where the container's upper disk goes: in the snapshot's upperdir when `mounts`
/// are an overlay snapshot with one (its usage is then the container's writable
/// layer for containerd and the kubelet), else in `work_dir`.
pub fn upper_disk_path(mounts: &[RootfsMount], work_dir: &Path) -> PathBuf {
    match mounts {
        [m] if m.kind == "overlay" => match parse_overlay_options(&m.options).upperdir {
            Some(upperdir) => upperdir.join(UPPER_IN_SNAPSHOT),
            None => work_dir.join(UPPER_IN_WORK_DIR),
        },
        _ => work_dir.join(UPPER_IN_WORK_DIR),
    }
}

/// Turns containerd's rootfs mounts into images: the layers' (cached), a non-empty
/// upperdir's or a bind-mounted tree's (uncached, in `work_dir`), and a fresh ext4
/// upper disk of `upper_bytes` at [`upper_disk_path`].
///
/// Writes in the VM go to that upper disk: containerd's snapshot sees none of the
/// container's files, only the disk.
///
/// Blocking (the caller runs it on tokio's blocking pool). On failure removes what it
/// made (and `work_dir` itself if it made it); cached layers stay, valid
/// for the next try.
pub fn prepare(
    cache: &LayerCache,
    mounts: &[RootfsMount],
    work_dir: &Path,
    upper_bytes: u64,
) -> Result<PreparedRootfs, RootfsError> {
    let mount = match mounts {
        [] => return Err(RootfsError::NoMounts),
        [one] => one,
        several => {
            let list: Vec<String> = several
                .iter()
                .map(|m| format!("{} {}", m.kind, m.source))
                .collect();
            return Err(RootfsError::SeveralMounts {
                count: several.len(),
                list: list.join(", "),
            });
        }
    };
    // Check the mount before making anything.
    let overlay = match mount.kind.as_str() {
        "overlay" => {
            let options = parse_overlay_options(&mount.options);
            if options.lowerdirs.is_empty() {
                return Err(RootfsError::MissingLowerdir {
                    mount_source: mount.source.clone(),
                    options: mount.options.join(","),
                });
            }
            Some(options)
        }
        "bind" | "rbind" => None,
        _ => {
            return Err(RootfsError::UnsupportedMount {
                kind: mount.kind.clone(),
                mount_source: mount.source.clone(),
            })
        }
    };
    let mut undo = Undo {
        files: Vec::new(),
        dir: None,
    };
    if !work_dir.exists() {
        std::fs::create_dir_all(work_dir)
            .map_err(|e| io_error("creating the container's work directory", work_dir, e))?;
        undo.dir = Some(work_dir.to_path_buf());
    }
    let upper = upper_disk_path(mounts, work_dir);
    // A disk an earlier task of this container left in the upperdir (a shim that
    // died before its delete) is not part of the snapshot.
    remove_if_there(&upper)?;
    let mut layers = Vec::new();
    let mut leases = Vec::new();
    match overlay {
        Some(options) => {
            if let Some(upper) = options.upperdir.as_deref().filter(|u| !is_empty_dir(u)) {
                let stem = work_dir.join("snapshot-upper");
                undo.files.push(stem.with_extension(cache.fstype()));
                layers.push(cache.image_of(upper, &stem)?);
            }
            let (image, lease) = cache.lease(&options.lowerdirs)?;
            layers.push(image);
            leases.push(lease);
        }
        None => {
            let stem = work_dir.join("rootfs");
            undo.files.push(stem.with_extension(cache.fstype()));
            layers.push(cache.image_of(Path::new(&mount.source), &stem)?);
        }
    }
    undo.files.push(upper.clone());
    build_upper(&cache.tools.ext4, &upper, upper_bytes)?;
    // Success: keep everything.
    undo.files.clear();
    undo.dir = None;
    Ok(PreparedRootfs {
        layers,
        upper,
        leases,
    })
}

/// Whether `dir` is an empty directory; a missing one counts as empty.
fn is_empty_dir(dir: &Path) -> bool {
    std::fs::read_dir(dir).map_or(true, |mut d| d.next().is_none())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    use std::sync::{Arc, Barrier};

    fn run(program: &str, args: &[&str]) {
        let out = Command::new(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("running {program}: {e}"));
        assert!(
            out.status.success(),
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn set_xattr(path: &Path, name: &str, value: &[u8]) {
        let p = CString::new(path.as_os_str().as_bytes()).unwrap();
        let n = CString::new(name).unwrap();
        // SAFETY: both strings are NUL-terminated and outlive the call; value's
        // pointer and length describe a live slice.
        let r = unsafe {
            libc::lsetxattr(
                p.as_ptr(),
                n.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        };
        assert_eq!(
            r,
            0,
            "setxattr {name} on {}: {}",
            path.display(),
            io::Error::last_os_error()
        );
    }

    fn get_xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
        let p = CString::new(path.as_os_str().as_bytes()).unwrap();
        let n = CString::new(name).unwrap();
        let mut buf = vec![0u8; 256];
        // SAFETY: both strings are NUL-terminated and outlive the call; the buffer's
        // pointer and length describe a live, writable slice.
        let r =
            unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        (r >= 0).then(|| buf[..r as usize].to_vec())
    }

    /// A layer-like tree: a file owned by 1234:5678, a symlink, an overlay whiteout
    /// (a 0:0 character device) and an opaque directory.
    fn layer_tree(parent: &Path, name: &str, content: &str) -> PathBuf {
        let tree = parent.join(name);
        std::fs::create_dir_all(tree.join("etc")).unwrap();
        std::fs::write(tree.join("etc/hello"), content).unwrap();
        std::os::unix::fs::chown(tree.join("etc/hello"), Some(1234), Some(5678)).unwrap();
        std::fs::set_permissions(
            tree.join("etc/hello"),
            std::fs::Permissions::from_mode(0o640),
        )
        .unwrap();
        std::os::unix::fs::symlink("hello", tree.join("etc/link")).unwrap();
        let whiteout = CString::new(tree.join("gone").as_os_str().as_bytes()).unwrap();
        // SAFETY: a NUL-terminated path that outlives the call.
        let r = unsafe { libc::mknod(whiteout.as_ptr(), libc::S_IFCHR, 0) };
        assert_eq!(r, 0, "mknod: {}", io::Error::last_os_error());
        std::fs::create_dir(tree.join("opaque")).unwrap();
        set_xattr(&tree.join("opaque"), "trusted.overlay.opaque", b"y");
        tree
    }

    /// An image loop-mounted read-only; unmounted on drop.
    struct Mounted {
        dir: tempfile::TempDir,
    }

    impl Mounted {
        fn new(image: &Path, fstype: &str) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let m = Mounted { dir };
            run(
                "mount",
                &[
                    "-o",
                    "loop,ro",
                    "-t",
                    fstype,
                    image.to_str().unwrap(),
                    m.dir.path().to_str().unwrap(),
                ],
            );
            m
        }

        fn path(&self) -> &Path {
            self.dir.path()
        }
    }

    impl Drop for Mounted {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(self.dir.path()).output();
        }
    }

    fn check_layer_tree(root: &Path, content: &str) {
        assert_eq!(
            std::fs::read_to_string(root.join("etc/hello")).unwrap(),
            content
        );
        let meta = std::fs::symlink_metadata(root.join("etc/hello")).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (1234, 5678), "owners kept");
        assert_eq!(meta.mode() & 0o777, 0o640);
        assert_eq!(
            std::fs::read_link(root.join("etc/link")).unwrap(),
            Path::new("hello")
        );
        let whiteout = std::fs::symlink_metadata(root.join("gone")).unwrap();
        assert!(
            whiteout.file_type().is_char_device() && whiteout.rdev() == 0,
            "whiteout kept"
        );
        assert_eq!(
            get_xattr(&root.join("opaque"), "trusted.overlay.opaque").as_deref(),
            Some(&b"y"[..]),
            "opaque xattr kept"
        );
    }

    fn ext4_magic(image: &Path) -> bool {
        let data = std::fs::read(image).unwrap();
        data.len() > 1082 && data[1080..1082] == [0x53, 0xef]
    }

    fn names_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .map(|d| {
                d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    fn overlay(lowers: &[&Path], upper: Option<&Path>) -> RootfsMount {
        let lower: Vec<String> = lowers.iter().map(|p| p.display().to_string()).collect();
        let mut options = vec![
            "index=off".to_string(),
            format!("lowerdir={}", lower.join(":")),
        ];
        if let Some(u) = upper {
            options.push(format!("upperdir={}", u.display()));
            options.push(format!("workdir={}", u.with_extension("work").display()));
        }
        options.push("userxattr".to_string());
        RootfsMount {
            kind: "overlay".to_string(),
            source: "overlay".to_string(),
            options,
        }
    }

    fn have_erofs() -> bool {
        Command::new("mkfs.erofs").arg("--help").output().is_ok()
    }

    #[test]
    fn overlay_options_parse_in_order_ignoring_the_unknown() {
        let o: Vec<String> = [
            "index=off",
            "lowerdir=/s/3/fs:/s/2/fs:/s/1/fs",
            "upperdir=/s/4/fs",
            "workdir=/s/4/work",
            "userxattr",
            "metacopy=on",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let parsed = parse_overlay_options(&o);
        assert_eq!(
            parsed,
            OverlayOptions {
                lowerdirs: vec!["/s/3/fs".into(), "/s/2/fs".into(), "/s/1/fs".into()],
                upperdir: Some("/s/4/fs".into()),
                workdir: Some("/s/4/work".into()),
            }
        );
        let one = parse_overlay_options(&["lowerdir=/s/1/fs".to_string()]);
        assert_eq!(one.lowerdirs, [PathBuf::from("/s/1/fs")]);
        assert_eq!(one.upperdir, None);
        assert!(parse_overlay_options(&["ro".to_string()])
            .lowerdirs
            .is_empty());
    }

    #[test]
    fn bad_mounts_are_refused_naming_them() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = LayerCache::new(tmp.path().join("cache"));
        let work = tmp.path().join("work");
        let err = |mounts: &[RootfsMount]| prepare(&cache, mounts, &work, 64 << 20).unwrap_err();
        assert!(matches!(err(&[]), RootfsError::NoMounts));
        let bind = RootfsMount {
            kind: "bind".into(),
            source: "/a".into(),
            options: vec!["rbind".into(), "rw".into()],
        };
        let e = err(&[bind.clone(), bind.clone()]);
        assert!(
            matches!(e, RootfsError::SeveralMounts { count: 2, .. }),
            "{e:?}"
        );
        assert!(e.to_string().contains("bind /a, bind /a"), "{e}");
        let tmpfs = RootfsMount {
            kind: "tmpfs".into(),
            source: "/x/fs".into(),
            options: vec![],
        };
        assert_eq!(
            err(&[tmpfs]).to_string(),
            "containerd passed tmpfs mount for /x/fs; peapod handles overlay and bind (native \
             snapshotter): configure the runtime's snapshotter as overlayfs or native"
        );
        let no_lower = RootfsMount {
            kind: "overlay".into(),
            source: "overlay".into(),
            options: vec!["upperdir=/u".into(), "workdir=/w".into()],
        };
        let e = err(&[no_lower]);
        assert!(matches!(e, RootfsError::MissingLowerdir { .. }), "{e:?}");
        assert!(e.to_string().contains("upperdir=/u,workdir=/w"), "{e}");
        assert!(!work.exists(), "nothing made for refused mounts");
        assert!(!cache.dir().exists());
    }

    #[test]
    fn missing_and_failing_mkfs_are_named() {
        let tmp = tempfile::tempdir().unwrap();
        let tree = tmp.path().join("tree");
        std::fs::create_dir(&tree).unwrap();
        std::fs::write(tree.join("f"), "x").unwrap();
        let missing = LayerCache::with_tools(
            tmp.path().join("cache1"),
            MkfsTools {
                erofs: Some("/nonexistent/mkfs.erofs".into()),
                ext4: "/nonexistent/mkfs.ext4".into(),
            },
        );
        let e = missing.layer(&tree).unwrap_err();
        assert!(matches!(e, RootfsError::MkfsMissing { .. }), "{e:?}");
        assert_eq!(
            e.to_string(),
            format!(
                "cannot run /nonexistent/mkfs.ext4 to turn {} into an image: it is not \
                 installed (install erofs-utils or e2fsprogs)",
                tree.display()
            )
        );
        // Only the lock file is left in the cache: no image, no temporary file.
        let names = names_in(missing.dir());
        assert!(names.len() == 1 && names[0].ends_with(".lock"), "{names:?}");

        let script = tmp.path().join("bad-mkfs");
        std::fs::write(
            &script,
            "#!/bin/sh\necho 'boom: no space in the universe' >&2\nexit 3\n",
        )
        .unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let failing = LayerCache::with_tools(
            tmp.path().join("cache2"),
            MkfsTools {
                erofs: Some(script.clone()),
                ext4: script.clone(),
            },
        );
        let e = failing.layer(&tree).unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, RootfsError::MkfsFailed { .. }), "{e:?}");
        assert!(text.contains("boom: no space in the universe"), "{text}");
        assert!(text.contains(&tree.display().to_string()), "{text}");
        assert!(text.contains("exit status: 3"), "{text}");
        let names = names_in(failing.dir());
        assert!(names.len() == 1 && names[0].ends_with(".lock"), "{names:?}");
    }

    #[test]
    fn a_layer_is_built_once_and_rebuilt_for_a_new_identity() {
        crate::test_util::require_root("it makes device nodes, trusted.* xattrs and loop mounts");
        let tmp = tempfile::tempdir().unwrap();
        let tree = layer_tree(tmp.path(), "layer", "one");
        let cache = LayerCache::new(tmp.path().join("cache"));
        let first = cache.layer(&tree).expect("first build");
        assert!(first.cached);
        assert!(first.path.starts_with(cache.dir()));
        assert_eq!(first.fstype, if have_erofs() { "erofs" } else { "ext4" });
        let meta = std::fs::metadata(&first.path).unwrap();
        assert_eq!(meta.len() % 4096, 0, "whole blocks");
        let second = cache.layer(&tree).expect("second call");
        assert_eq!(second, first);
        let again = std::fs::metadata(&second.path).unwrap();
        assert_eq!(
            (again.ino(), again.mtime(), again.mtime_nsec()),
            (meta.ino(), meta.mtime(), meta.mtime_nsec())
        );
        assert_eq!(cache.builds(), 1);
        // Another process's cache on the same directory finds it too.
        let other = LayerCache::new(cache.dir());
        assert_eq!(other.layer(&tree).unwrap(), first);
        assert_eq!(other.builds(), 0);

        // New content at the same path: a new key, a new image with it.
        std::fs::remove_dir_all(&tree).unwrap();
        let tree = layer_tree(tmp.path(), "layer", "two");
        let rebuilt = cache.layer(&tree).expect("rebuild");
        assert_ne!(rebuilt.path, first.path);
        assert_eq!(cache.builds(), 2);
        let m = Mounted::new(&rebuilt.path, rebuilt.fstype);
        assert_eq!(
            std::fs::read_to_string(m.path().join("etc/hello")).unwrap(),
            "two"
        );
        // An added entry changes the directory's ctime: rebuilt as well.
        std::fs::write(tree.join("new"), "").unwrap();
        let third = cache.layer(&tree).unwrap();
        assert_ne!(third.path, rebuilt.path);
        assert_eq!(cache.builds(), 3);
        // A crashed builder's temporary file is removed by the next build of its key.
        std::fs::write(tree.join("touch"), "").unwrap();
        let key = chain_key(std::slice::from_ref(&tree)).unwrap();
        let stale = cache.dir().join(format!("{key}.tmp-99999999-0.erofs"));
        std::fs::write(&stale, "half an image").unwrap();
        cache.layer(&tree).unwrap();
        assert!(!stale.exists(), "the leftover was removed");
        assert_eq!(cache.builds(), 4);
    }

    #[test]
    fn racing_builders_make_one_image() {
        crate::test_util::require_root("it makes device nodes, trusted.* xattrs and loop mounts");
        let tmp = tempfile::tempdir().unwrap();
        let tree = layer_tree(tmp.path(), "layer", "race");
        // Several files, so that the build takes a while.
        for i in 0..200 {
            std::fs::write(tree.join(format!("f{i}")), vec![b'x'; 10_000]).unwrap();
        }
        let cache_dir = tmp.path().join("cache");
        let barrier = Arc::new(Barrier::new(2));
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let (tree, dir, barrier) = (tree.clone(), cache_dir.clone(), barrier.clone());
                std::thread::spawn(move || {
                    // A cache each, as two shim processes would have.
                    let cache = LayerCache::new(dir);
                    barrier.wait();
                    let image = cache.layer(&tree).expect("racing build");
                    (image, cache.builds())
                })
            })
            .collect();
        let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        assert_eq!(results[0].0, results[1].0);
        assert_eq!(results[0].1 + results[1].1, 1, "built once: {results:?}");
        let names = names_in(&cache_dir);
        assert_eq!(
            names.len(),
            3,
            "the image, its layer list and its lock, no temporary file: {names:?}"
        );
        let m = Mounted::new(&results[0].0.path, results[0].0.fstype);
        assert_eq!(
            std::fs::read_to_string(m.path().join("etc/hello")).unwrap(),
            "race"
        );
        assert_eq!(std::fs::read(m.path().join("f199")).unwrap().len(), 10_000);
    }

    #[test]
    fn erofs_images_hold_the_tree() {
        crate::test_util::require_root("it makes device nodes, trusted.* xattrs and loop mounts");
        assert!(
            have_erofs(),
            "this test needs mkfs.erofs: install erofs-utils"
        );
        let tmp = tempfile::tempdir().unwrap();
        let tree = layer_tree(tmp.path(), "layer", "erofs content");
        let image = tmp.path().join("layer.erofs");
        build_erofs(Path::new("mkfs.erofs"), &tree, &image).expect("mkfs.erofs");
        let m = Mounted::new(&image, "erofs");
        check_layer_tree(m.path(), "erofs content");
    }

    #[test]
    fn ext4_images_hold_the_tree_and_fit() {
        crate::test_util::require_root("it makes device nodes, trusted.* xattrs and loop mounts");
        let tmp = tempfile::tempdir().unwrap();
        let tree = layer_tree(tmp.path(), "layer", "ext4 content");
        // Many small files and a big one: the size estimate must hold both.
        std::fs::create_dir(tree.join("many")).unwrap();
        for i in 0..3000 {
            std::fs::write(tree.join(format!("many/{i}")), format!("{i}")).unwrap();
        }
        std::fs::write(tree.join("big"), vec![7u8; 5 << 20]).unwrap();
        let image = tmp.path().join("layer.ext4");
        build_ext4(Path::new("mkfs.ext4"), &tree, &image).expect("mkfs.ext4 -d");
        assert!(ext4_magic(&image));
        let size = std::fs::metadata(&image).unwrap().len();
        assert!(size < 64 << 20, "not grossly oversized: {size}");
        let m = Mounted::new(&image, "ext4");
        check_layer_tree(m.path(), "ext4 content");
        assert_eq!(
            std::fs::read_to_string(m.path().join("many/2999")).unwrap(),
            "2999"
        );
        assert_eq!(
            std::fs::read(m.path().join("big")).unwrap(),
            vec![7u8; 5 << 20]
        );
        // A cache without mkfs.erofs falls back to ext4.
        let cache = LayerCache::with_tools(
            tmp.path().join("cache"),
            MkfsTools {
                erofs: None,
                ext4: "mkfs.ext4".into(),
            },
        );
        let layer = cache.layer(&tree).unwrap();
        assert_eq!(layer.fstype, "ext4");
        assert!(layer.path.to_string_lossy().ends_with(".ext4"));
        assert!(ext4_magic(&layer.path));
    }

    #[test]
    fn prepare_an_overlay_snapshot() {
        crate::test_util::require_root("it makes device nodes, trusted.* xattrs and loop mounts");
        let tmp = tempfile::tempdir().unwrap();
        let l1 = layer_tree(tmp.path(), "l1", "top");
        let l2 = layer_tree(tmp.path(), "l2", "bottom");
        let upper = tmp.path().join("upper");
        std::fs::create_dir(&upper).unwrap();
        let cache = LayerCache::new(tmp.path().join("cache"));
        let work = tmp.path().join("work");

        // An empty upperdir adds nothing.
        let p = prepare(
            &cache,
            &[overlay(&[&l1, &l2], Some(&upper))],
            &work,
            64 << 20,
        )
        .expect("prepare");
        assert_eq!(p.layers.len(), 1, "one image for the chain");
        assert!(p.layers[0].cached);
        assert_eq!(p.layers[0], cache.chain(&[l1.clone(), l2.clone()]).unwrap());
        // The upper disk is in the upperdir, where containerd counts its blocks.
        assert_eq!(p.upper, upper.join(UPPER_IN_SNAPSHOT));
        assert!(ext4_magic(&p.upper));
        let upper_meta = std::fs::metadata(&p.upper).unwrap();
        assert_eq!(upper_meta.len(), 64 << 20);
        assert!(
            upper_meta.blocks() * 512 < 16 << 20,
            "sparse: {} blocks",
            upper_meta.blocks()
        );
        // The guest will not write its inode tables' zeroes to the disk.
        let groups = String::from_utf8(
            Command::new("dumpe2fs")
                .arg(&p.upper)
                .stderr(std::process::Stdio::null())
                .output()
                .unwrap()
                .stdout,
        )
        .unwrap();
        let group_lines: Vec<&str> = groups
            .lines()
            .filter(|l| l.starts_with("Group ") && l.contains("(Blocks"))
            .collect();
        assert!(!group_lines.is_empty(), "{groups}");
        for g in &group_lines {
            assert!(g.contains("ITABLE_ZEROED"), "{g}");
        }

        // A non-empty upperdir goes on top, uncached, in the work dir; the disk an
        // earlier task left there is not part of it.
        std::fs::write(upper.join("written"), "by containerd").unwrap();
        let p = prepare(
            &cache,
            &[overlay(&[&l1, &l2], Some(&upper))],
            &work,
            64 << 20,
        )
        .expect("prepare with an upper");
        assert_eq!(p.layers.len(), 2);
        assert!(!p.layers[0].cached && p.layers[0].path.starts_with(&work));
        assert!(p.layers[1].cached);
        let m = Mounted::new(&p.layers[0].path, p.layers[0].fstype);
        assert_eq!(
            std::fs::read_to_string(m.path().join("written")).unwrap(),
            "by containerd"
        );
        assert!(!m.path().join(UPPER_IN_SNAPSHOT).exists());
        assert_eq!(cache.builds(), 1, "the chain built once");
        drop(m);

        // Without an upperdir the disk goes in the work dir.
        let p = prepare(&cache, &[overlay(&[&l1], None)], &work, 64 << 20).expect("prepare");
        assert_eq!(p.upper, work.join(UPPER_IN_WORK_DIR));
        assert!(ext4_magic(&p.upper));
    }

    /// Two layers as an image builder leaves them: the top one replaces a file, deletes
    /// one (a whiteout) and makes a directory opaque.
    fn two_layers(parent: &Path) -> (PathBuf, PathBuf) {
        let bottom = parent.join("bottom");
        for d in ["etc", "opaque", "keep"] {
            std::fs::create_dir_all(bottom.join(d)).unwrap();
        }
        std::fs::write(bottom.join("etc/hello"), "bottom").unwrap();
        std::fs::write(bottom.join("gone"), "deleted above").unwrap();
        std::fs::write(bottom.join("opaque/old"), "hidden above").unwrap();
        std::fs::write(bottom.join("keep/x"), "kept").unwrap();
        let top = layer_tree(parent, "top", "top");
        std::fs::write(top.join("opaque/new"), "new").unwrap();
        (top, bottom)
    }

    #[test]
    fn a_chain_is_one_image_of_the_merged_tree() {
        crate::test_util::require_root("it makes device nodes, trusted.* xattrs and mounts");
        let tmp = tempfile::tempdir().unwrap();
        let (top, bottom) = two_layers(tmp.path());
        let cache = LayerCache::new(tmp.path().join("cache"));
        let image = cache.chain(&[top.clone(), bottom.clone()]).unwrap();
        assert!(image.cached);
        let m = Mounted::new(&image.path, image.fstype);
        let root = m.path();
        assert_eq!(
            std::fs::read_to_string(root.join("etc/hello")).unwrap(),
            "top"
        );
        let meta = std::fs::symlink_metadata(root.join("etc/hello")).unwrap();
        assert_eq!(
            (meta.uid(), meta.gid(), meta.mode() & 0o777),
            (1234, 5678, 0o640)
        );
        assert!(!root.join("gone").exists(), "the whiteout deleted it");
        assert_eq!(
            names_in(&root.join("opaque")),
            ["new"],
            "opaque: nothing from below"
        );
        assert_eq!(
            get_xattr(&root.join("opaque"), "trusted.overlay.opaque"),
            None
        );
        assert_eq!(
            std::fs::read_to_string(root.join("keep/x")).unwrap(),
            "kept"
        );
        drop(m);
        // Found again, not rebuilt; the same layers in another order are another image.
        assert_eq!(cache.chain(&[top.clone(), bottom.clone()]).unwrap(), image);
        assert_eq!(cache.builds(), 1);
        let reversed = cache.chain(&[bottom.clone(), top.clone()]).unwrap();
        assert_ne!(reversed.path, image.path);
        // The same merge into ext4, where mkfs.erofs is missing.
        let ext4 = LayerCache::with_tools(
            tmp.path().join("ext4-cache"),
            MkfsTools {
                erofs: None,
                ..MkfsTools::default()
            },
        );
        let image4 = ext4.chain(&[top.clone(), bottom.clone()]).unwrap();
        assert_eq!(image4.fstype, "ext4");
        let m = Mounted::new(&image4.path, "ext4");
        assert_eq!(
            std::fs::read_to_string(m.path().join("etc/hello")).unwrap(),
            "top"
        );
        assert!(!m.path().join("gone").exists());
        assert_eq!(
            std::fs::read_to_string(m.path().join("keep/x")).unwrap(),
            "kept"
        );
        drop(m);
        // Nothing but images, their lists and locks in the cache: no mount point, no
        // temporary file.
        assert!(
            names_in(cache.dir()).iter().all(|n| n.ends_with(".lock")
                || n.ends_with(".layers")
                || n.ends_with(image.fstype)),
            "{:?}",
            names_in(cache.dir())
        );
    }

    #[test]
    fn a_collection_keeps_leased_images_and_drops_stale_then_least_recently_used() {
        crate::test_util::require_root("it makes device nodes and trusted.* xattrs");
        let tmp = tempfile::tempdir().unwrap();
        let cache = LayerCache::new(tmp.path().join("cache"));
        let trees: Vec<PathBuf> = ["a", "b", "c", "d"]
            .iter()
            .map(|n| layer_tree(tmp.path(), n, n))
            .collect();
        let mut images = Vec::new();
        let mut leases = Vec::new();
        for t in &trees {
            let (image, lease) = cache.lease(std::slice::from_ref(t)).unwrap();
            images.push(image);
            leases.push(Some(lease));
            // Distinct last-used times, a then b then c then d.
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let size = std::fs::metadata(&images[0].path).unwrap().len();
        let exists = |i: usize| images[i].path.exists();

        // Everything leased: nothing goes, even with layers gone and a bound of 0.
        std::fs::remove_dir_all(&trees[3]).unwrap();
        let c = cache.collect(Some(0));
        assert!(c.removed.is_empty(), "{c:?}");
        assert_eq!(c.kept_bytes, 4 * size);

        // Unleased with its layer gone (containerd removed the image): goes, bound or
        // not, with its list and lock.
        leases[3] = None;
        let c = cache.collect(None);
        assert_eq!(c.removed, [images[3].path.clone()]);
        assert!(!exists(3));
        let key = images[3]
            .path
            .file_stem()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        assert!(!names_in(cache.dir()).iter().any(|n| n.starts_with(&key)));

        // Over the bound: unleased images go, least recently used first; leased ones
        // stay even when older.
        leases[1] = None;
        leases[2] = None;
        let c = cache.collect(Some(2 * size));
        assert_eq!(c.removed, [images[1].path.clone()], "b, the older idle one");
        assert!(exists(0) && exists(2));
        assert_eq!(c.kept_bytes, 2 * size);
        // Used again: c is now the newest; a (leased) still stays.
        let (_, lease_c) = cache.lease(std::slice::from_ref(&trees[2])).unwrap();
        assert!(cache.collect(Some(0)).removed.is_empty());
        drop(lease_c);
        assert_eq!(cache.collect(Some(size)).removed, [images[2].path.clone()]);
        assert!(exists(0));
        // An image from before the layer lists (no list): stale once unleased.
        leases[0] = None;
        std::fs::remove_file(images[0].path.with_extension(LAYERS_EXT)).unwrap();
        assert_eq!(cache.collect(None).removed, [images[0].path.clone()]);
        // Rebuilt on the next use.
        let again = cache.layer(&trees[0]).unwrap();
        assert!(again.path.exists());
    }

    #[test]
    fn chains_of_hundreds_of_layers_merge_and_too_many_are_refused() {
        crate::test_util::require_root("it mounts overlays");
        let tmp = tempfile::tempdir().unwrap();
        // As containerd's overlayfs snapshotter lays them out: snapshots/<n>/fs.
        let layer = |n: usize| {
            let dir = tmp.path().join(format!("snapshots/{n}/fs"));
            std::fs::create_dir_all(dir.join("stack")).unwrap();
            std::fs::write(dir.join(format!("stack/{n}")), n.to_string()).unwrap();
            dir
        };
        let mut dirs: Vec<PathBuf> = (1..=200).rev().map(layer).collect();
        let cache = LayerCache::new(tmp.path().join("cache"));
        let image = cache.chain(&dirs).expect("200 layers");
        let m = Mounted::new(&image.path, image.fstype);
        assert_eq!(names_in(&m.path().join("stack")).len(), 200);
        assert_eq!(
            std::fs::read_to_string(m.path().join("stack/200")).unwrap(),
            "200"
        );
        drop(m);
        dirs.splice(0..0, (201..=OVERLAY_MAX_LAYERS + 1).rev().map(layer));
        let e = cache.chain(&dirs).unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, RootfsError::Merge { layers: 501, .. }), "{e:?}");
        assert!(
            text.contains("at most 500 layers") && text.contains("squash"),
            "{text}"
        );
        assert!(
            text.contains(&tmp.path().join("snapshots").display().to_string()),
            "{text}"
        );
    }

    #[test]
    fn prepare_a_bind_mounted_tree_uncached() {
        crate::test_util::require_root("it makes device nodes, trusted.* xattrs and loop mounts");
        let tmp = tempfile::tempdir().unwrap();
        let tree = layer_tree(tmp.path(), "rootfs", "native");
        let cache = LayerCache::new(tmp.path().join("cache"));
        let work = tmp.path().join("work");
        let bind = RootfsMount {
            kind: "bind".into(),
            source: tree.display().to_string(),
            options: vec!["rbind".into(), "rw".into()],
        };
        let p = prepare(&cache, &[bind], &work, 32 << 20).expect("prepare");
        assert_eq!(p.layers.len(), 1);
        assert!(!p.layers[0].cached);
        assert_eq!(p.layers[0].path.parent(), Some(work.as_path()));
        assert_eq!(cache.builds(), 0);
        assert!(names_in(cache.dir()).is_empty());
        let m = Mounted::new(&p.layers[0].path, p.layers[0].fstype);
        check_layer_tree(m.path(), "native");
    }

    #[test]
    fn a_failed_prepare_leaves_nothing_in_the_work_dir() {
        crate::test_util::require_root("it makes device nodes, trusted.* xattrs and loop mounts");
        let tmp = tempfile::tempdir().unwrap();
        let l1 = layer_tree(tmp.path(), "l1", "top");
        let upper = tmp.path().join("upper");
        std::fs::create_dir(&upper).unwrap();
        std::fs::write(upper.join("written"), "x").unwrap();
        let cache = LayerCache::new(tmp.path().join("cache"));

        // A missing lower, after the upperdir's image was made: undone, and the work
        // dir, made by prepare, removed.
        let work = tmp.path().join("work");
        let missing = tmp.path().join("no-such-layer");
        let e = prepare(
            &cache,
            &[overlay(&[&l1, &missing], Some(&upper))],
            &work,
            64 << 20,
        )
        .unwrap_err();
        assert!(
            e.to_string().contains(&missing.display().to_string()),
            "{e}"
        );
        assert!(!work.exists(), "{:?}", names_in(&work));

        // A work dir that was there stays, empty: here the upper disk fails.
        std::fs::create_dir(&work).unwrap();
        let e = prepare(&cache, &[overlay(&[&l1], Some(&upper))], &work, 8192).unwrap_err();
        assert!(matches!(e, RootfsError::MkfsFailed { .. }), "{e:?}");
        assert!(e.to_string().contains(UPPER_IN_SNAPSHOT), "{e}");
        assert!(work.is_dir());
        assert_eq!(names_in(&work), Vec::<String>::new());
        assert_eq!(names_in(&upper), vec!["written".to_string()]);
    }
}
