//! A directory handle whose operations never leave it.
//!
//! Directories the host writes into (the shared directory of CopyFile) are also
//! written by containers, which may plant symlinks there. Every path below a
//! [`Beneath`] is resolved by the kernel with `openat2(RESOLVE_BENEATH |
//! RESOLVE_NO_MAGICLINKS)`: an absolute symlink, a `..` that climbs out or a
//! `/proc` magic link fails with `EXDEV` or `ELOOP` instead of being followed, and
//! relative symlinks that stay inside (Kubernetes' `..data`) still work. The last
//! component of what is written, chmodded or chowned is never followed: the
//! operation is on the fd or, for a symlink, on the link itself.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{openat2, renameat, AtFlags, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{fchmod, mkdirat, Mode};
use nix::unistd::{fchown, fchownat, symlinkat, unlinkat, Gid, Uid, UnlinkatFlags};

/// The mode of the directories [`Beneath::make_dirs`] makes on the way.
const DIR_MODE: u32 = 0o755;

/// An open directory; paths given to its methods are relative to it and stay in it.
#[derive(Debug)]
pub struct Beneath {
    dir: OwnedFd,
    /// For messages only: the kernel never resolves it again.
    path: PathBuf,
}

/// Who owns what is written.
#[derive(Debug, Clone, Copy)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

impl Owner {
    fn ids(self) -> (Option<Uid>, Option<Gid>) {
        (Some(Uid::from_raw(self.uid)), Some(Gid::from_raw(self.gid)))
    }
}

impl Beneath {
    /// Opens `path` as a root. It is trusted: it must be a directory no container
    /// can write to or replace (one of the agent's own under /run/peapod).
    pub fn open(path: &Path) -> io::Result<Self> {
        let dir = nix::fcntl::open(path, dir_flags(), Mode::empty())?;
        Ok(Self {
            dir,
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The directory `name` (one component) in this one, made with `mode` if missing
    /// and given `mode` and `owner` either way. A symlink in its place is refused.
    pub fn dir(&self, name: &Path, mode: u32, owner: Owner) -> io::Result<Beneath> {
        let name = one_component(name)?;
        match mkdirat(&self.dir, name, Mode::from_bits_truncate(mode)) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(e.into()),
        }
        let dir = openat2(
            &self.dir,
            name,
            how(dir_flags(), ResolveFlag::RESOLVE_NO_SYMLINKS),
        )?;
        set_mode_and_owner(&dir, mode, owner)?;
        Ok(self.child(dir, name))
    }

    /// The directory at `rel` (plain names, no `..`), made (mode 0755, owned by the
    /// agent) with its missing parents. Symlinks on the way are followed as long as
    /// they stay below `self`.
    pub fn make_dirs(&self, rel: &Path) -> io::Result<Beneath> {
        if rel.as_os_str().is_empty() {
            return Ok(self.child(self.dir.try_clone()?, rel));
        }
        if !rel.components().all(|c| matches!(c, Component::Normal(_))) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{rel:?} is not a relative path of plain names"),
            ));
        }
        match openat2(&self.dir, rel, how(dir_flags(), ResolveFlag::empty())) {
            Ok(dir) => return Ok(self.child(dir, rel)),
            Err(Errno::ENOENT) => {}
            Err(e) => return Err(e.into()),
        }
        let parent = self.make_dirs(rel.parent().unwrap_or(Path::new("")))?;
        let name = one_component(Path::new(rel.file_name().unwrap_or_default()))?;
        match mkdirat(&parent.dir, name, Mode::from_bits_truncate(DIR_MODE)) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(e.into()),
        }
        let dir = openat2(&self.dir, rel, how(dir_flags(), ResolveFlag::empty()))?;
        Ok(self.child(dir, rel))
    }

    /// Writes `data` at `offset` of the regular file `name` (one component), made if
    /// missing and emptied first if `truncate`, and gives it `mode` and `owner`.
    pub fn write_file(
        &self,
        name: &Path,
        data: &[u8],
        offset: u64,
        truncate: bool,
        mode: u32,
        owner: Owner,
    ) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let name = one_component(name)?;
        // O_NONBLOCK: a FIFO a container planted fails (ENXIO) instead of blocking.
        let flags = OFlag::O_WRONLY
            | OFlag::O_CREAT
            | OFlag::O_NOFOLLOW
            | OFlag::O_NONBLOCK
            | OFlag::O_NOCTTY
            | OFlag::O_CLOEXEC;
        let how = how(flags, ResolveFlag::RESOLVE_NO_SYMLINKS).mode(Mode::from_bits_truncate(mode));
        let file = self.regular(openat2(&self.dir, name, how)?, name)?;
        if truncate {
            file.set_len(0)?;
        }
        file.write_all_at(data, offset)?;
        set_mode_and_owner(&file, mode, owner)
    }

    /// Points the symlink `name` (one component) at `target`, replacing what was
    /// there in one rename, as the kubelet swaps `..data`, and gives the link itself
    /// `owner`.
    pub fn swap_symlink(&self, name: &Path, target: &Path, owner: Owner) -> io::Result<()> {
        let name = one_component(name)?;
        let mut tmp = std::ffi::OsString::from(".");
        tmp.push(name);
        tmp.push(".peapod-tmp");
        let tmp = Path::new(&tmp);
        let _ = unlinkat(&self.dir, tmp, UnlinkatFlags::NoRemoveDir);
        symlinkat(target, &self.dir, tmp)?;
        renameat(&self.dir, tmp, &self.dir, name)?;
        let (uid, gid) = owner.ids();
        fchownat(&self.dir, name, uid, gid, AtFlags::AT_SYMLINK_NOFOLLOW)?;
        Ok(())
    }

    /// The first `limit` bytes of the regular file at `rel`, resolved as if `self`
    /// were `/` (`RESOLVE_IN_ROOT`): what a container sees at that path in its own
    /// root, never a file of the guest's, a device or a FIFO.
    pub fn read_in_root(&self, rel: &Path, limit: u64) -> io::Result<Vec<u8>> {
        use std::io::Read;
        let flags = OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_NOCTTY | OFlag::O_CLOEXEC;
        let how = OpenHow::new()
            .flags(flags)
            .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
        let file = self.regular(openat2(&self.dir, rel, how)?, rel)?;
        let mut data = Vec::new();
        file.take(limit).read_to_end(&mut data)?;
        Ok(data)
    }

    /// `fd`, opened at `rel`, if it is a regular file: a FIFO or a device a
    /// container planted is not read or written.
    fn regular(&self, fd: OwnedFd, rel: &Path) -> io::Result<File> {
        let file = File::from(fd);
        if file.metadata()?.is_file() {
            Ok(file)
        } else {
            Err(io::Error::other(format!(
                "{} is not a regular file",
                self.path.join(rel).display()
            )))
        }
    }

    fn child(&self, dir: OwnedFd, rel: &Path) -> Beneath {
        Beneath {
            dir,
            path: self.path.join(rel),
        }
    }
}

fn dir_flags() -> OFlag {
    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC
}

/// `flags` resolved beneath the dirfd, never through a magic link, plus `extra`.
fn how(flags: OFlag, extra: ResolveFlag) -> OpenHow {
    OpenHow::new()
        .flags(flags)
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS | extra)
}

/// `name` if it is one plain component (no `/`, `.` or `..`).
fn one_component(name: &Path) -> io::Result<&Path> {
    let mut parts = name.components();
    match (parts.next(), parts.next()) {
        (Some(Component::Normal(_)), None) => Ok(name),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not a single file name"),
        )),
    }
}

fn set_mode_and_owner(fd: impl AsFd, mode: u32, owner: Owner) -> io::Result<()> {
    let fd = fd.as_fd();
    // Owner first: a chown clears the set-id bits that the mode may set.
    let (uid, gid) = owner.ids();
    fchown(fd, uid, gid)?;
    fchmod(fd, Mode::from_bits_truncate(mode))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::fs;

    use nix::sys::stat::{makedev, mknod, SFlag};

    use super::*;

    #[test]
    fn reads_in_root_take_only_regular_files_inside() {
        let dir = tempfile::tempdir().unwrap();
        let root_path = dir.path().join("rootfs");
        fs::create_dir_all(root_path.join("dev")).unwrap();
        fs::write(dir.path().join("secret"), "guest").unwrap();
        fs::write(root_path.join("secret"), "image").unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret"), root_path.join("abs")).unwrap();
        std::os::unix::fs::symlink("../../secret", root_path.join("dev/up")).unwrap();
        nix::unistd::mkfifo(&root_path.join("fifo"), Mode::S_IRWXU).unwrap();
        let root = Beneath::open(&root_path).unwrap();
        let read = |rel: &str| root.read_in_root(Path::new(rel), 3);

        // Absolute symlinks and `..` stay in the root, as in the container.
        assert!(
            read("abs").is_err(),
            "{} is the guest's",
            dir.path().join("secret").display()
        );
        assert_eq!(read("dev/up").unwrap(), b"ima");
        assert_eq!(read("/dev/../../secret").unwrap(), b"ima");
        // A FIFO would block the read for ever without O_NONBLOCK.
        let e = read("fifo").unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
        let zero = root_path.join("dev/zero");
        if mknod(
            &zero,
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o666),
            makedev(1, 5),
        )
        .is_ok()
        {
            let e = read("dev/zero").unwrap_err().to_string();
            assert!(e.contains("not a regular file"), "{e}");
        }
    }

    #[test]
    fn names_are_single_components() {
        let dir = tempfile::tempdir().unwrap();
        let root = Beneath::open(dir.path()).unwrap();
        let me = Owner {
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
        };
        for bad in ["a/b", "..", ".", "", "/etc"] {
            assert!(root.dir(Path::new(bad), 0o755, me).is_err(), "{bad:?}");
            assert!(root
                .write_file(Path::new(bad), b"x", 0, true, 0o644, me)
                .is_err());
            assert!(root
                .swap_symlink(Path::new(bad), Path::new("t"), me)
                .is_err());
        }
        for bad in ["..", "a/../..", "./a", "/etc"] {
            assert!(root.make_dirs(Path::new(bad)).is_err(), "{bad:?}");
        }
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
