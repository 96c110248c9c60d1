//! Files the host copies into the sandbox (CopyFile): ConfigMap, Secret,
//! projected and downward-API volumes, and the pod's /etc/hosts and resolv.conf.

use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use peapod_agent_protocol::CopyFileRequest;

#[derive(Debug, thiserror::Error)]
#[error("CopyFile {path}: {step}: {cause}")]
pub struct CopyError {
    path: String,
    step: &'static str,
    cause: io::Error,
}

/// Writes one file, directory or symlink (or one chunk of a file) at `path`,
/// creating its parent directories.
pub fn copy_in(path: &Path, req: &CopyFileRequest) -> Result<(), CopyError> {
    let err = |step: &'static str| {
        let path = path.display().to_string();
        move |cause| CopyError { path, step, cause }
    };
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(err("creating its directory"))?;
    }
    let mode = if req.mode == 0 {
        if req.dir {
            0o755
        } else {
            0o644
        }
    } else {
        req.mode & 0o7777
    };
    if req.dir {
        fs::create_dir_all(path).map_err(err("creating the directory"))?;
        fs::set_permissions(path, fs::Permissions::from_mode(mode))
            .map_err(err("setting its mode"))?;
    } else if !req.symlink_target.is_empty() {
        // Replace atomically: Kubernetes updates volumes by swapping a symlink.
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let tmp = path.with_file_name(format!(".{name}.peapod-tmp"));
        let _ = fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&req.symlink_target, &tmp)
            .map_err(err("creating the symlink"))?;
        fs::rename(&tmp, path).map_err(err("moving the symlink into place"))?;
        return chown(path, req, true).map_err(err("setting its owner"));
    } else {
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(req.offset == 0)
            .mode(mode)
            .open(path)
            .map_err(err("opening the file"))?;
        file.write_all_at(&req.data, req.offset)
            .map_err(err("writing"))?;
        file.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(err("setting its mode"))?;
    }
    chown(path, req, false).map_err(err("setting its owner"))
}

fn chown(path: &Path, req: &CopyFileRequest, symlink: bool) -> io::Result<()> {
    if symlink {
        std::os::unix::fs::lchown(path, Some(req.uid), Some(req.gid))
    } else {
        std::os::unix::fs::chown(path, Some(req.uid), Some(req.gid))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(data: &[u8], offset: u64) -> CopyFileRequest {
        CopyFileRequest {
            data: data.to_vec(),
            offset,
            mode: 0o600,
            uid: nix::unistd::getuid().as_raw(),
            gid: nix::unistd::getgid().as_raw(),
            ..Default::default()
        }
    }

    #[test]
    fn files_arrive_in_chunks_and_symlinks_swap() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("vol/..data_1/key");
        copy_in(&file, &req(b"hello ", 0)).unwrap();
        copy_in(&file, &req(b"world", 6)).unwrap();
        assert_eq!(fs::read(&file).unwrap(), b"hello world");
        assert_eq!(
            fs::metadata(&file).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // A new first chunk replaces the old content.
        copy_in(&file, &req(b"v2", 0)).unwrap();
        assert_eq!(fs::read(&file).unwrap(), b"v2");

        let link = dir.path().join("vol/..data");
        let mut r = req(b"", 0);
        r.symlink_target = "..data_1".into();
        copy_in(&link, &r).unwrap();
        r.symlink_target = "..data_2".into();
        copy_in(&link, &r).unwrap();
        assert_eq!(fs::read_link(&link).unwrap(), Path::new("..data_2"));
    }
}
