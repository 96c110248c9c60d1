//! Files the host copies into the sandbox (CopyFile): ConfigMap, Secret,
//! projected and downward-API volumes, and the pod's /etc/hosts and resolv.conf.

use std::io;
use std::path::Path;

use peapod_agent_protocol::CopyFileRequest;

use crate::beneath::{Beneath, Owner};

#[derive(Debug, thiserror::Error)]
#[error("CopyFile {path}: {step}: {cause}{}", hint(cause))]
pub struct CopyError {
    path: String,
    step: &'static str,
    cause: io::Error,
}

/// What a person can do about the errors [`Beneath`] gives for paths that leave it.
fn hint(cause: &io::Error) -> &'static str {
    match cause.raw_os_error() {
        Some(libc::EXDEV) => {
            " (the path leads out of its volume through an absolute symlink or '..', which \
             a container may have planted there: nothing was written; remove that symlink \
             in the guest, or recreate the pod)"
        }
        Some(libc::ELOOP) => {
            " (a symlink stands where the file or directory itself belongs, and it is not \
             followed: a container may have planted it; nothing was written; remove it in \
             the guest, or recreate the pod)"
        }
        Some(libc::ENXIO) => {
            " (a FIFO or socket stands where the file belongs, which a container may have \
             planted: nothing was written; remove it in the guest, or recreate the pod)"
        }
        _ => "",
    }
}

/// Writes one file, directory or symlink (or one chunk of a file) at `rel` under
/// `shared`, creating its parent directories. The first component is the volume:
/// nothing below it is allowed to lead out of it.
pub fn copy_in(shared: &Beneath, rel: &Path, req: &CopyFileRequest) -> Result<(), CopyError> {
    let err = |step: &'static str| {
        let path = shared.path().join(rel).display().to_string();
        move |cause| CopyError { path, step, cause }
    };
    let mut parts = rel.components();
    let volume_name = parts.next().map(|c| c.as_os_str()).unwrap_or_default();
    let in_volume = parts.as_path();
    let volume;
    let (root, rel) = if in_volume.as_os_str().is_empty() {
        (shared, rel)
    } else {
        volume = shared
            .make_dirs(Path::new(volume_name))
            .map_err(err("creating its volume directory"))?;
        (&volume, in_volume)
    };
    let parent = root
        .make_dirs(rel.parent().unwrap_or(Path::new("")))
        .map_err(err("creating its directory"))?;
    let name = Path::new(rel.file_name().unwrap_or_default());
    let owner = Owner {
        uid: req.uid,
        gid: req.gid,
    };
    let mode = match (req.mode, req.dir) {
        (0, true) => 0o755,
        (0, false) => 0o644,
        (mode, _) => mode & 0o7777,
    };
    if req.dir {
        parent
            .dir(name, mode, owner)
            .map(drop)
            .map_err(err("creating the directory"))
    } else if !req.symlink_target.is_empty() {
        parent
            .swap_symlink(name, Path::new(&req.symlink_target), owner)
            .map_err(err("creating the symlink"))
    } else {
        parent
            .write_file(name, &req.data, req.offset, req.offset == 0, mode, owner)
            .map_err(err("writing the file"))
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
    use std::path::PathBuf;

    use super::*;

    /// As root the files are given away, so a chown that went astray shows.
    fn uid() -> u32 {
        if nix::unistd::geteuid().is_root() {
            4321
        } else {
            nix::unistd::geteuid().as_raw()
        }
    }

    fn file(data: &[u8], offset: u64) -> CopyFileRequest {
        CopyFileRequest {
            data: data.to_vec(),
            offset,
            mode: 0o600,
            uid: uid(),
            gid: uid(),
            ..Default::default()
        }
    }

    fn dir() -> CopyFileRequest {
        CopyFileRequest {
            dir: true,
            mode: 0o777,
            ..file(b"", 0)
        }
    }

    fn link(target: &str) -> CopyFileRequest {
        CopyFileRequest {
            symlink_target: target.into(),
            ..file(b"", 0)
        }
    }

    /// A temp dir holding the shared directory and, beside it, what a container
    /// must not reach: an "/etc" and another container's rootfs.
    struct Guest {
        _tmp: tempfile::TempDir,
        shared: Beneath,
        etc: PathBuf,
        other_rootfs: PathBuf,
    }

    impl Guest {
        fn new() -> Self {
            let tmp = tempfile::tempdir().unwrap();
            let etc = tmp.path().join("etc");
            let other_rootfs = tmp.path().join("containers/c2/rootfs");
            for d in [&etc, &other_rootfs.join("etc")] {
                fs::create_dir_all(d).unwrap();
                fs::write(d.join("passwd"), "root:x:0:0\n").unwrap();
                fs::set_permissions(d.join("passwd"), fs::Permissions::from_mode(0o644)).unwrap();
            }
            fs::create_dir_all(tmp.path().join("shared/vol")).unwrap();
            fs::create_dir_all(tmp.path().join("shared/other-vol")).unwrap();
            let shared = Beneath::open(&tmp.path().join("shared")).unwrap();
            Guest {
                _tmp: tmp,
                shared,
                etc,
                other_rootfs,
            }
        }

        fn path(&self, rel: &str) -> PathBuf {
            self.shared.path().join(rel)
        }

        /// A symlink a container wrote into its volume.
        fn plant(&self, rel: &str, target: &Path) {
            symlink(target, self.path(rel)).unwrap();
        }

        fn copy(&self, rel: &str, req: &CopyFileRequest) -> Result<(), CopyError> {
            copy_in(&self.shared, Path::new(rel), req)
        }

        /// Nothing outside the shared directory was written, chmodded or chowned.
        fn assert_untouched(&self) {
            for d in [self.etc.clone(), self.other_rootfs.join("etc")] {
                let names: Vec<_> = fs::read_dir(&d)
                    .unwrap()
                    .map(|e| e.unwrap().file_name())
                    .collect();
                assert_eq!(names, ["passwd"], "{}", d.display());
                let passwd = d.join("passwd");
                assert_eq!(fs::read_to_string(&passwd).unwrap(), "root:x:0:0\n");
                let meta = fs::metadata(&passwd).unwrap();
                assert_eq!(meta.mode() & 0o7777, 0o644);
                assert_eq!(meta.uid(), nix::unistd::geteuid().as_raw());
            }
            assert!(!self.path("other-vol/passwd").exists());
        }
    }

    #[test]
    fn files_arrive_in_chunks_and_symlinks_swap() {
        let g = Guest::new();
        g.copy("vol/..data_1/key", &file(b"hello ", 0)).unwrap();
        g.copy("vol/..data_1/key", &file(b"world", 6)).unwrap();
        let key = g.path("vol/..data_1/key");
        assert_eq!(fs::read(&key).unwrap(), b"hello world");
        let meta = fs::metadata(&key).unwrap();
        assert_eq!((meta.mode() & 0o7777, meta.uid()), (0o600, uid()));
        // A new first chunk replaces the old content.
        g.copy("vol/..data_1/key", &file(b"v2", 0)).unwrap();
        assert_eq!(fs::read(&key).unwrap(), b"v2");

        g.copy("vol/..data", &link("..data_1")).unwrap();
        g.copy("vol/..data", &link("..data_2")).unwrap();
        assert_eq!(
            fs::read_link(g.path("vol/..data")).unwrap(),
            Path::new("..data_2")
        );
        assert_eq!(
            fs::symlink_metadata(g.path("vol/..data")).unwrap().uid(),
            uid()
        );
    }

    #[test]
    fn the_kubelets_atomic_update_still_works() {
        let g = Guest::new();
        g.copy("vol", &dir()).unwrap();
        g.copy("vol/..2026_01", &dir()).unwrap();
        g.copy("vol/..2026_01/key", &file(b"one", 0)).unwrap();
        g.copy("vol/..data", &link("..2026_01")).unwrap();
        g.copy("vol/key", &link("..data/key")).unwrap();
        assert_eq!(fs::read(g.path("vol/key")).unwrap(), b"one");

        g.copy("vol/..2026_02/key", &file(b"two", 0)).unwrap();
        g.copy("vol/..data", &link("..2026_02")).unwrap();
        assert_eq!(fs::read(g.path("vol/key")).unwrap(), b"two");
        // A file reached through `..data` lands in the directory it points at.
        g.copy("vol/..data/extra", &file(b"three", 0)).unwrap();
        assert_eq!(fs::read(g.path("vol/..2026_02/extra")).unwrap(), b"three");
        let mode = fs::metadata(g.path("vol")).unwrap().mode();
        assert_eq!(mode & 0o7777, 0o777);
        g.assert_untouched();
    }

    #[test]
    fn a_symlink_to_etc_redirects_nothing() {
        let g = Guest::new();
        g.plant("vol/etc", &g.etc);
        g.plant("vol/passwd", &g.etc.join("passwd"));
        for (rel, req) in [
            ("vol/etc/passwd", file(b"evil", 0)),
            ("vol/etc/shadow", file(b"evil", 0)),
            ("vol/etc/sub/file", file(b"evil", 0)),
            ("vol/etc", dir()),
            ("vol/etc/sub", dir()),
            ("vol/passwd", file(b"evil", 0)),
            ("vol/passwd", dir()),
        ] {
            let e = g.copy(rel, &req).unwrap_err().to_string();
            assert!(e.contains(&g.path(rel).display().to_string()), "{e}");
            assert!(
                e.contains("planted") && e.contains("nothing was written"),
                "{e}"
            );
            g.assert_untouched();
        }
        // Replacing the planted link swaps the link itself and chowns only it.
        g.copy("vol/passwd", &link("..data/passwd")).unwrap();
        assert_eq!(
            fs::read_link(g.path("vol/passwd")).unwrap(),
            Path::new("..data/passwd")
        );
        g.assert_untouched();
    }

    #[test]
    fn a_symlink_into_another_rootfs_or_volume_redirects_nothing() {
        let g = Guest::new();
        g.plant("vol/up", Path::new("../../containers/c2/rootfs/etc"));
        g.plant("vol/abs", &g.other_rootfs);
        g.plant("vol/next", Path::new("../other-vol"));
        fs::create_dir(g.path("vol/sub")).unwrap();
        g.plant("vol/sub/back", Path::new("../../other-vol"));
        for rel in [
            "vol/up/passwd",
            "vol/abs/etc/passwd",
            "vol/next/passwd",
            "vol/sub/back/passwd",
        ] {
            let e = g.copy(rel, &file(b"evil", 0)).unwrap_err().to_string();
            assert!(e.contains("leads out of its volume"), "{e}");
            g.assert_untouched();
        }
    }

    #[test]
    fn dot_dot_and_odd_files_are_refused() {
        let g = Guest::new();
        for rel in ["vol/../etc/passwd", "vol/a/../../../etc/passwd"] {
            assert!(g.copy(rel, &file(b"evil", 0)).is_err(), "{rel}");
        }
        // A FIFO would block a write for ever: it is refused at once.
        nix::unistd::mkfifo(
            &g.path("vol/fifo"),
            nix::sys::stat::Mode::from_bits_truncate(0o644),
        )
        .unwrap();
        let e = g.copy("vol/fifo", &file(b"x", 0)).unwrap_err().to_string();
        assert!(e.contains("FIFO"), "{e}");
        g.assert_untouched();
    }
}
