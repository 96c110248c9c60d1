//! Templates (issue 20, item 3): a snapshot of a guest booted to its agent, from
//! which later pods of the same kind start instead of booting.
//!
//! ```text
//!  a pod's VM: key = hash(the VMM's, kernel's and initramfs's identities, vCPUs,
//!    memory, card or not, console, kernel command line)
//!   <template_dir>/<key>/vm.state exists -> Restore: `peapod-vmm --restore`
//!   else <key>.lock taken (flock, never waited for) -> Build: boot; once the agent
//!     answers, pause, vm.snapshot into .build-<key>-<pid>/, resume, rename to <key>
//!   else (another pod is building it) -> Boot
//! ```
//!
//! A template whose restore fails is removed and the pod boots; the next pod of its
//! kind builds it again. Past `template_max` templates the oldest go.

use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::config::{Config, VmSize};

/// The files of a template, as the VMM names them.
pub const STATE_FILE: &str = "vm.state";
pub const MEMORY_FILE: &str = "memory";

/// How a pod's VM starts.
pub enum Plan {
    /// Boot the guest; no template.
    Boot,
    /// Restore the template in this directory.
    Restore(PathBuf),
    /// Boot, and leave a template.
    Build(Builder),
}

/// A template being made: the lock that says so, and where it is written.
pub struct Builder {
    staging: PathBuf,
    dir: PathBuf,
    /// Held (flock) until the template is published or given up.
    _lock: File,
}

/// What decides the guest a VM boots: two VMs of one key are the same guest.
pub fn key(config: &Config, size: VmSize, with_card: bool) -> io::Result<String> {
    let mut text = String::new();
    for file in [&config.vmm, &config.kernel, &config.initrd] {
        let m = std::fs::metadata(file)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", file.display())))?;
        text.push_str(&format!(
            "{} {} {} {} {}.{}\n",
            file.display(),
            m.dev(),
            m.ino(),
            m.size(),
            m.mtime(),
            m.mtime_nsec()
        ));
    }
    text.push_str(&format!(
        "vcpus {} memory {} card {with_card} console {} cmdline {:?} quirks {}\n",
        size.vcpus,
        size.memory_mib,
        config.guest_console,
        config.kernel_cmdline,
        crate::jail::platform_quirks(),
    ));
    let digest = Sha256::digest(text.as_bytes());
    Ok(digest[..8].iter().map(|b| format!("{b:02x}")).collect())
}

/// How a VM of `key` starts, given the templates in `template_dir`.
pub fn plan(template_dir: &Path, key: &str) -> Plan {
    let dir = template_dir.join(key);
    if dir.join(STATE_FILE).is_file() {
        return Plan::Restore(dir);
    }
    match Builder::take(template_dir, key) {
        Ok(Some(b)) => Plan::Build(b),
        Ok(None) => Plan::Boot,
        Err(e) => {
            log::warn!("template {key}: cannot prepare one ({e}); booting without");
            Plan::Boot
        }
    }
}

impl Builder {
    /// The lock of `key`'s template and an empty staging directory, unless another
    /// pod holds the lock (`None`).
    fn take(template_dir: &Path, key: &str) -> io::Result<Option<Builder>> {
        std::fs::create_dir_all(template_dir)?;
        let lock = File::create(template_dir.join(format!("{key}.lock")))?;
        // SAFETY: flock on a descriptor this function owns.
        if unsafe {
            libc::flock(
                std::os::fd::AsRawFd::as_raw_fd(&lock),
                libc::LOCK_EX | libc::LOCK_NB,
            )
        } != 0
        {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EWOULDBLOCK) => Ok(None),
                _ => Err(e),
            };
        }
        let dir = template_dir.join(key);
        if dir.join(STATE_FILE).is_file() {
            // Published between the look and the lock.
            return Ok(None);
        }
        let staging = template_dir.join(format!(".build-{key}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&staging);
        std::fs::create_dir(&staging)?;
        Ok(Some(Builder {
            staging,
            dir,
            _lock: lock,
        }))
    }

    /// Where the VMM writes the snapshot (the jail gives its uid this directory).
    pub fn staging(&self) -> &Path {
        &self.staging
    }

    /// Makes the written snapshot the template: its files become root's and
    /// read-only, and the directory takes the key's name. Then the oldest templates
    /// go past `max`.
    pub fn publish(self, max: usize) -> io::Result<PathBuf> {
        for name in [STATE_FILE, MEMORY_FILE] {
            let path = self.staging.join(name);
            std::os::unix::fs::chown(&path, Some(0), Some(0))?;
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o444))?;
        }
        std::os::unix::fs::chown(&self.staging, Some(0), Some(0))?;
        std::fs::set_permissions(
            &self.staging,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )?;
        std::fs::rename(&self.staging, &self.dir)?;
        if let Some(parent) = self.dir.parent() {
            collect(parent, max, &self.dir);
        }
        Ok(self.dir.clone())
    }
}

impl Drop for Builder {
    fn drop(&mut self) {
        // Given up (or published, when it is gone already).
        let _ = std::fs::remove_dir_all(&self.staging);
    }
}

/// Removes the template in `dir` (a restore refused it); the next pod of its kind
/// builds it again.
pub fn discard(dir: &Path) {
    let aside = dir.with_extension(format!("discarded-{}", std::process::id()));
    if std::fs::rename(dir, &aside).is_ok() {
        let _ = std::fs::remove_dir_all(&aside);
    }
}

/// Removes the oldest templates in `template_dir` past `max`, never `keep`.
fn collect(template_dir: &Path, max: usize, keep: &Path) {
    let Ok(entries) = std::fs::read_dir(template_dir) else {
        return;
    };
    let mut templates: Vec<(std::time::SystemTime, PathBuf)> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join(STATE_FILE).is_file() && p != keep)
        .filter_map(|p| Some((p.join(STATE_FILE).metadata().ok()?.modified().ok()?, p)))
        .collect();
    templates.sort();
    let excess = (templates.len() + 1).saturating_sub(max);
    for (_, path) in templates.into_iter().take(excess) {
        log::info!("template {}: removed (more than {max})", path.display());
        discard(&path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path) -> Config {
        let files = ["vmm", "vmlinux", "initrd"].map(|n| {
            let p = dir.join(n);
            std::fs::write(&p, n).unwrap();
            p
        });
        let [vmm, kernel, initrd] = files;
        Config {
            vmm,
            kernel,
            initrd,
            ..Config::default()
        }
    }

    fn size(vcpus: u32, memory_mib: u64) -> VmSize {
        VmSize { vcpus, memory_mib }
    }

    #[test]
    fn a_key_changes_with_what_decides_the_guest_and_only_that() {
        let dir = tempfile::tempdir().unwrap();
        let c = config(dir.path());
        let k = key(&c, size(1, 256), true).unwrap();
        assert_eq!(k.len(), 16);
        assert_eq!(k, key(&c, size(1, 256), true).unwrap());
        assert_ne!(k, key(&c, size(2, 256), true).unwrap());
        assert_ne!(k, key(&c, size(1, 512), true).unwrap());
        assert_ne!(k, key(&c, size(1, 256), false).unwrap());
        let console = Config {
            guest_console: true,
            ..c.clone()
        };
        assert_ne!(k, key(&console, size(1, 256), true).unwrap());
        let other_health = Config {
            health_interval_secs: 1,
            ..c.clone()
        };
        assert_eq!(k, key(&other_health, size(1, 256), true).unwrap());
        // A new kernel (replaced by rename, as installs do) is another guest.
        let new = dir.path().join("vmlinux.new");
        std::fs::write(&new, "vmlinux 2").unwrap();
        std::fs::rename(&new, &c.kernel).unwrap();
        assert_ne!(k, key(&c, size(1, 256), true).unwrap());
        std::fs::remove_file(&c.initrd).unwrap();
        let e = key(&c, size(1, 256), true).unwrap_err();
        assert!(e.to_string().contains("initrd"), "{e}");
    }

    #[test]
    fn one_builder_at_a_time_then_restores_and_the_oldest_go() {
        let dir = tempfile::tempdir().unwrap();
        let templates = dir.path().join("templates");
        let Plan::Build(builder) = plan(&templates, "k1") else {
            panic!("the first pod builds the template");
        };
        assert!(
            matches!(plan(&templates, "k1"), Plan::Boot),
            "the lock is held"
        );
        for name in [STATE_FILE, MEMORY_FILE] {
            std::fs::write(builder.staging().join(name), name).unwrap();
        }
        let published = builder.publish(2).unwrap();
        assert_eq!(published, templates.join("k1"));
        let Plan::Restore(restore) = plan(&templates, "k1") else {
            panic!("later pods restore");
        };
        assert_eq!(restore, published);
        let mode = std::fs::metadata(published.join(MEMORY_FILE))
            .unwrap()
            .mode();
        assert_eq!(mode & 0o777, 0o444);

        // A builder that gives up leaves nothing but the lock file.
        let Plan::Build(builder) = plan(&templates, "k2") else {
            panic!("k2 is built");
        };
        let staging = builder.staging().to_path_buf();
        drop(builder);
        assert!(!staging.exists());
        assert!(matches!(plan(&templates, "k2"), Plan::Build(_)));

        // Past the bound, the oldest template goes.
        for k in ["k2", "k3"] {
            let Plan::Build(b) = plan(&templates, k) else {
                panic!("{k} is built");
            };
            for name in [STATE_FILE, MEMORY_FILE] {
                std::fs::write(b.staging().join(name), name).unwrap();
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
            b.publish(2).unwrap();
        }
        assert!(!templates.join("k1").exists(), "the oldest went");
        assert!(templates.join("k2").exists() && templates.join("k3").exists());

        discard(&templates.join("k3"));
        assert!(!templates.join("k3").exists());
        assert!(matches!(plan(&templates, "k3"), Plan::Build(_)));
    }
}
