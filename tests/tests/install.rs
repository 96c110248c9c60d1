//! `make install`'s script (shim/deploy/install.sh), staged under DESTDIR with the real
//! artefacts: every file lands where docs/install.md says, the RuntimeClass carries
//! figures, the operator's config survives a second run, and a second run replaces the
//! kernel by rename (a VM holding the old one keeps reading it).

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use peapod_tests::{initrd, kernel, repo_root, shim_binary, vmm_binary};

fn install(dest: &Path) -> String {
    let out = Command::new(repo_root().join("shim/deploy/install.sh"))
        .arg(shim_binary())
        .arg(vmm_binary())
        .arg(kernel())
        .arg(initrd())
        .env("DESTDIR", dest)
        .env("PREFIX", "/usr/local")
        .output()
        .expect("running shim/deploy/install.sh");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "install.sh failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn install_puts_every_file_in_place_and_replaces_by_rename() {
    let dest = tempfile::tempdir().unwrap();
    let d = dest.path();
    let said = install(d);
    let placed = [
        (
            "usr/local/bin/containerd-shim-peapod-v2",
            shim_binary(),
            0o755,
        ),
        ("usr/local/bin/peapod-vmm", vmm_binary(), 0o755),
        ("usr/share/peapod/vmlinux", kernel(), 0o644),
        ("usr/share/peapod/initramfs.cpio", initrd(), 0o644),
        (
            "usr/share/peapod/containerd-1.x.toml",
            repo_root().join("shim/deploy/containerd-1.x.toml"),
            0o644,
        ),
        (
            "usr/share/peapod/containerd-2.x.toml",
            repo_root().join("shim/deploy/containerd-2.x.toml"),
            0o644,
        ),
    ];
    for (path, source, mode) in &placed {
        let at = d.join(path);
        let meta = std::fs::metadata(&at).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(meta.mode() & 0o777, *mode, "{path}'s mode");
        assert_eq!(
            std::fs::read(&at).unwrap(),
            std::fs::read(source).unwrap(),
            "{path} is a copy of {}",
            source.display()
        );
    }
    let runtime_class =
        std::fs::read_to_string(d.join("usr/share/peapod/runtimeclass.yaml")).unwrap();
    assert!(runtime_class.contains("handler: peapod"), "{runtime_class}");
    assert!(
        !runtime_class.contains("PODFIXED"),
        "the RuntimeClass has its measured overhead filled in:\n{runtime_class}"
    );
    for key in ["memory:", "cpu:"] {
        assert!(
            runtime_class.contains(key),
            "overhead.podFixed {key} in\n{runtime_class}"
        );
    }
    assert!(d.join("var/lib/peapod/layers").is_dir());
    assert!(d.join("var/lib/peapod/pods").is_dir());
    let config = d.join("etc/peapod/config.toml");
    assert!(
        std::fs::read_to_string(&config)
            .unwrap()
            .contains("/usr/local/bin/peapod-vmm"),
        "the shim's config names the installed VMM"
    );
    assert!(
        said.contains("runtimeclass.yaml"),
        "install.sh says what to do next: {said}"
    );

    // A second run: the operator's config stays, and the kernel is a new file (a
    // running VM keeps the one it opened).
    std::fs::write(&config, "log_level = \"debug\"\n").unwrap();
    let vmlinux = d.join("usr/share/peapod/vmlinux");
    let held = std::fs::File::open(&vmlinux).unwrap();
    let old_inode = held.metadata().unwrap().ino();
    install(d);
    assert_eq!(
        std::fs::read_to_string(&config).unwrap(),
        "log_level = \"debug\"\n"
    );
    assert_ne!(
        std::fs::metadata(&vmlinux).unwrap().ino(),
        old_inode,
        "the kernel is replaced by rename, not rewritten in place"
    );
    drop(held);
    let leftovers: Vec<_> = walk(d)
        .into_iter()
        .filter(|p| p.to_string_lossy().ends_with(".peapod-new"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}

#[test]
fn install_names_a_missing_artefact_and_the_fix() {
    let dest = tempfile::tempdir().unwrap();
    let out = Command::new(repo_root().join("shim/deploy/install.sh"))
        .args([
            "/nonexistent/shim",
            "/nonexistent/vmm",
            "/nonexistent/k",
            "/nonexistent/i",
        ])
        .env("DESTDIR", dest.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("/nonexistent/shim") && stderr.contains("make build"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_dir(dest.path()).unwrap().count(),
        0,
        "nothing installed"
    );
}
