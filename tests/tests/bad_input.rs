//! Bad input to the VMM: each case is a clear error naming the cause, a non-zero exit
//! and nothing left behind.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use peapod_tests::{initrd, kernel, require_kvm, vmm_binary};

struct Outcome {
    code: Option<i32>,
    stderr: String,
}

fn files_in(dir: &Path) -> BTreeSet<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect()
}

/// Runs the VMM with `args` (`{kernel}`, `{initrd}` and `{dir}` substituted) and checks
/// that it left nothing in `dir`, where its API socket and console would go.
fn run_vmm(dir: &Path, args: &[&str]) -> Outcome {
    require_kvm();
    let before = files_in(dir);
    let subst = |a: &&str| {
        a.replace("{kernel}", kernel().to_str().unwrap())
            .replace("{initrd}", initrd().to_str().unwrap())
            .replace("{dir}", dir.to_str().unwrap())
    };
    let mut full: Vec<String> = vec![
        "--api-socket".into(),
        dir.join("api.sock").to_str().unwrap().into(),
    ];
    full.extend(args.iter().map(subst));
    let out = Command::new(vmm_binary()).args(&full).output().unwrap();
    let after = files_in(dir);
    let leftovers: Vec<_> = after.difference(&before).collect();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(leftovers.is_empty(), "left behind {leftovers:?}\n{stderr}");
    Outcome {
        code: out.status.code(),
        stderr,
    }
}

fn assert_fails(dir: &Path, args: &[&str], expected: &[&str]) {
    let out = run_vmm(dir, args);
    assert_eq!(out.code, Some(1), "exit code for {args:?}\n{}", out.stderr);
    for e in expected {
        assert!(
            out.stderr.contains(e),
            "{args:?}: stderr lacks {e:?}:\n{}",
            out.stderr
        );
    }
}

#[test]
fn missing_kernel_is_named_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    assert_fails(
        dir.path(),
        &["--kernel", "{dir}/no-vmlinux", "--initrd", "{initrd}"],
        &[
            "kernel ",
            "/no-vmlinux: No such file",
            "kernel-config/build.sh",
        ],
    );
}

#[test]
fn non_elf_kernel_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    // An initramfs is a real file that is not a kernel; so is a bzImage-like blob.
    let bz = dir.path().join("bzImage");
    std::fs::write(&bz, [b"MZ".as_slice(), &[0u8; 4096]].concat()).unwrap();
    for k in ["{initrd}", bz.to_str().unwrap()] {
        assert_fails(
            dir.path(),
            &["--kernel", k, "--initrd", "{initrd}"],
            &["not an ELF vmlinux", "bzImage is not supported"],
        );
    }
}

#[test]
fn memory_too_small_for_the_kernel_or_initrd() {
    let dir = tempfile::tempdir().unwrap();
    assert_fails(
        dir.path(),
        &[
            "--kernel", "{kernel}", "--initrd", "{initrd}", "--memory", "16",
        ],
        &[
            "occupies guest memory up to",
            "the VM has 16 MiB",
            "give the VM more memory",
        ],
    );
    let big = dir.path().join("big.cpio");
    std::fs::write(&big, vec![0u8; 40 << 20]).unwrap();
    assert_fails(
        dir.path(),
        &[
            "--kernel",
            "{kernel}",
            "--initrd",
            big.to_str().unwrap(),
            "--memory",
            "48",
        ],
        &["big.cpio", "do not fit", "give the VM more memory"],
    );
}

#[test]
fn too_many_vcpus_and_bad_sizes_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let base = ["--kernel", "{kernel}", "--initrd", "{initrd}"];
    let with = |extra: &[&'static str]| -> Vec<&'static str> {
        base.iter().copied().chain(extra.iter().copied()).collect()
    };
    assert_fails(
        dir.path(),
        &with(&["--vcpus", "255"]),
        &["vcpus = 255", "between 1 and 254"],
    );
    assert_fails(dir.path(), &with(&["--vcpus", "0"]), &["vcpus = 0"]);
    assert_fails(
        dir.path(),
        &with(&["--memory", "129"]),
        &["multiple of 2 MiB", "use 128 or 130"],
    );
}

#[test]
fn unreadable_initrd_is_named() {
    let dir = tempfile::tempdir().unwrap();
    assert_fails(
        dir.path(),
        &["--kernel", "{kernel}", "--initrd", "{dir}/missing.cpio"],
        &["initrd ", "missing.cpio: No such file", "rootfs/build.sh"],
    );
    let subdir = dir.path().join("a-directory");
    std::fs::create_dir(&subdir).unwrap();
    assert_fails(
        dir.path(),
        &["--kernel", "{kernel}", "--initrd", subdir.to_str().unwrap()],
        &["initrd ", "a-directory"],
    );
}

#[test]
fn malformed_config_files_are_named_with_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, &[&str])] = &[
        ("vcpus = \"two\"", &["vm.toml", "invalid type"]),
        ("vcpu = 2", &["vm.toml", "unknown field `vcpu`"]),
        ("memory_mib = [", &["vm.toml", "line 1"]),
        ("console = \"\"", &["vm.toml", "console"]),
    ];
    let config = dir.path().join("vm.toml");
    for (text, expected) in cases {
        std::fs::write(&config, text).unwrap();
        assert_fails(
            dir.path(),
            &["--config", config.to_str().unwrap()],
            expected,
        );
    }
    assert_fails(
        dir.path(),
        &["--config", "{dir}/absent.toml"],
        &["config file", "absent.toml", "No such file"],
    );
}

#[test]
fn a_config_file_with_good_keys_is_used() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("vm.toml");
    // Valid keys from the file; the too-small memory proves the file was read.
    std::fs::write(
        &config,
        format!(
            "kernel = {:?}\ninitrd = {:?}\nmemory_mib = 12\n",
            kernel(),
            initrd()
        ),
    )
    .unwrap();
    assert_fails(
        dir.path(),
        &["--config", config.to_str().unwrap()],
        &["the VM has 12 MiB"],
    );
}

#[test]
fn unwritable_console_and_busy_api_socket_are_named() {
    let dir = tempfile::tempdir().unwrap();
    assert_fails(
        dir.path(),
        &[
            "--kernel",
            "{kernel}",
            "--initrd",
            "{initrd}",
            "--console",
            "{dir}/no/such/dir/c.log",
        ],
        &["console ", "c.log", "cannot open it for writing"],
    );
    // A live listener on the socket path belongs to someone else: refuse, leave it.
    let busy = dir.path().join("api.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&busy).unwrap();
    assert_fails(
        dir.path(),
        &["--kernel", "{kernel}", "--initrd", "{initrd}"],
        &["api.sock", "another process is listening"],
    );
    assert!(busy.exists(), "the other process's socket is left alone");
}
