//! Boot benchmark: prints, measured in one run on this machine,
//! - VMM process start to the first KVM_RUN (target under 5 ms),
//! - spawn to the agent's ready line, Peapod against QEMU's `microvm` machine booting
//!   the same kernel, initramfs and command line (ratio, target at most 1.0),
//! - the VMM's RSS outside guest memory once the guest is ready (target under 5 MiB),
//! - the cost of the hardening: both figures above for the VMM as the shim runs it
//!   (seccomp filters on, in the shim's jail) against `--no-seccomp` outside any jail,
//!   alternated in the same run (target: within 5%).
//!
//! `cargo bench -p peapod-tests --bench boot` (or `make bench`). PEAPOD_BENCH_RUNS sets
//! the number of boots per VMM (default 3); the start-up figure takes 20 samples.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use peapod_shim::config::DEFAULT_JAIL_ID_BASE;
use peapod_shim::jail::{self, Jail, JailSpec};
use peapod_tests::memory::rss_outside_guest_kib;
use peapod_tests::{initrd, kernel, require_kvm, vmm_binary, READY_PREFIX};

const MEMORY_MIB: u64 = 128;
const STARTUP_SAMPLES: usize = 20;

fn monotonic_ns() -> u128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes a timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u128 * 1_000_000_000 + ts.tv_nsec as u128
}

fn stop(mut child: Child) {
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// How the VMM runs: as the shim runs it (seccomp filters on, in the shim's jail), or
/// with neither (`--no-seccomp`, the host's tree, root).
#[derive(Clone, Copy, PartialEq)]
enum Hardening {
    On,
    Off,
}

/// The VMM's command. Jailed, its files have the jail's names and its API socket is in
/// `dir`/run, the directory its /run is bound to.
fn peapod_command(dir: &Path, console: &str, hardening: Hardening) -> Command {
    // The jail hides /sys, where the VMM would look: both are told, alike.
    let quirks = jail::platform_quirks();
    let (run, root) = (dir.join("run"), dir.join("root"));
    let mut c = match hardening {
        Hardening::Off => {
            let mut c = Command::new(vmm_binary());
            c.arg("--no-seccomp")
                .arg("--kernel")
                .arg(kernel())
                .arg("--initrd")
                .arg(initrd())
                .arg("--api-socket")
                .arg(dir.join("api.sock"));
            c
        }
        Hardening::On => {
            let jail = Jail::new(&JailSpec {
                root: &root,
                run_dir: &run,
                vmm: &vmm_binary(),
                kernel: &kernel(),
                initrd: &initrd(),
                uid_base: DEFAULT_JAIL_ID_BASE,
                memory_mib: MEMORY_MIB,
                vcpus: 1,
                template: None,
                template_out: None,
            })
            .unwrap_or_else(|e| panic!("{e}"));
            let mut c = Command::new(jail::VMM);
            c.arg("--kernel")
                .arg(jail::KERNEL)
                .arg("--initrd")
                .arg(jail::INITRD)
                .arg("--api-socket")
                .arg(format!("{}/api.sock", jail::RUN_DIR));
            // SAFETY: Jail::enter makes only async-signal-safe system calls, on memory
            // prepared before the fork.
            unsafe { c.pre_exec(move || jail.enter()) };
            c
        }
    };
    c.args(["--platform-quirks", quirks])
        .arg("--memory")
        .arg(MEMORY_MIB.to_string())
        .arg("--console")
        .arg(console);
    c
}

/// Starts Peapod, returns what follows `marker` in the first log line that has it, and
/// stops the VMM.
fn logged_value(dir: &Path, console: &str, marker: &str, hardening: Hardening) -> String {
    let mut child = peapod_command(dir, console, hardening)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let value = stderr
        .lines()
        .find_map(|line| line.unwrap().split(marker).nth(1).map(str::to_string));
    stop(child);
    value.unwrap_or_else(|| panic!("the VMM's log has no {marker:?}"))
}

/// Spawn-to-first-KVM_RUN, from the VMM's log line that stamps CLOCK_MONOTONIC.
fn startup_once(dir: &Path, hardening: Hardening) -> Duration {
    let t0 = monotonic_ns();
    let ns: u128 = logged_value(dir, "off", "first KVM_RUN at monotonic_ns=", hardening)
        .trim()
        .parse()
        .unwrap();
    Duration::from_nanos((ns - t0) as u64)
}

/// Spawns `cmd` (console on stdout), returns the time to the ready line and the
/// still-running child.
fn boot_to_ready(mut cmd: Command) -> (Duration, Child) {
    let start = Instant::now();
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    for line in stdout.split(b'\n') {
        let line = String::from_utf8_lossy(&line.unwrap()).into_owned();
        if line.contains(READY_PREFIX) {
            return (start.elapsed(), child);
        }
    }
    let _ = child.kill();
    let status = child.wait();
    panic!("{cmd:?}: the guest did not reach its ready line ({status:?})");
}

struct Boot {
    ready: Duration,
    rss_outside_kib: u64,
}

fn measure(cmd: Command) -> Boot {
    let (ready, child) = boot_to_ready(cmd);
    // Let the guest settle so RSS is the idle figure, not mid-boot.
    std::thread::sleep(Duration::from_millis(500));
    let (rss_outside_kib, _) = rss_outside_guest_kib(child.id(), MEMORY_MIB << 20);
    stop(child);
    Boot {
        ready,
        rss_outside_kib,
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// The command line Peapod gives the kernel with the console on, so that QEMU boots
/// exactly the same guest.
fn peapod_cmdline(dir: &Path) -> String {
    logged_value(dir, "/dev/null", "kernel command line: ", Hardening::Off)
}

fn qemu_command(cmdline: &str) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    c.args([
        "-M",
        "microvm,x-option-roms=off,rtc=off,ioapic2=off,acpi=off",
        "-enable-kvm",
        // QEMU 7.2 cannot set IA32_ARCH_CAPABILITIES on this host's KVM and aborts.
        "-cpu",
        "host,-arch-capabilities",
        "-smp",
        "1",
        "-m",
        &format!("{MEMORY_MIB}M"),
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-no-reboot",
    ])
    .arg("-kernel")
    .arg(kernel())
    .arg("-initrd")
    .arg(initrd())
    .arg("-append")
    .arg(cmdline);
    c
}

fn main() {
    require_kvm();
    if Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("qemu-system-x86_64 not found: install Debian's qemu-system-x86 (make deps)");
        std::process::exit(1);
    }
    let runs: usize = std::env::var("PEAPOD_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let dir = tempfile::tempdir().unwrap();

    // Alternate, so drift in this shared machine's speed hits both alike.
    let (mut startup, mut startup_bare) = (Vec::new(), Vec::new());
    for _ in 0..STARTUP_SAMPLES {
        startup.push(startup_once(dir.path(), Hardening::On));
        startup_bare.push(startup_once(dir.path(), Hardening::Off));
    }
    let mut sorted = startup.clone();
    sorted.sort();

    let cmdline = peapod_cmdline(dir.path());
    let (mut peapod, mut bare, mut qemu) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        peapod.push(measure(peapod_command(dir.path(), "stdout", Hardening::On)));
        bare.push(measure(peapod_command(
            dir.path(),
            "stdout",
            Hardening::Off,
        )));
        qemu.push(measure(qemu_command(&cmdline)));
    }
    let p_ready = median(peapod.iter().map(|b| b.ready).collect());
    let b_ready = median(bare.iter().map(|b| b.ready).collect());
    let q_ready = median(qemu.iter().map(|b| b.ready).collect());
    let p_rss = peapod.iter().map(|b| b.rss_outside_kib).max().unwrap();
    let q_rss = qemu.iter().map(|b| b.rss_outside_kib).max().unwrap();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;

    println!(
        "peapod boot benchmark: {MEMORY_MIB} MiB, 1 vCPU, same kernel, initramfs and command line"
    );
    println!("kernel command line: {cmdline}");
    println!(
        "start to first KVM_RUN   median {:.2} ms (min {:.2}, max {:.2}, {} runs)   target < 5 ms",
        ms(sorted[sorted.len() / 2]),
        ms(sorted[0]),
        ms(sorted[sorted.len() - 1]),
        sorted.len()
    );
    println!(
        "spawn to ready line      peapod median {:.2} s, qemu microvm median {:.2} s ({runs} runs each), ratio {:.3}   target <= 1.0",
        p_ready.as_secs_f64(),
        q_ready.as_secs_f64(),
        p_ready.as_secs_f64() / q_ready.as_secs_f64()
    );
    println!(
        "RSS outside guest memory peapod {:.2} MiB, qemu microvm {:.2} MiB (max over runs)   target < 5 MiB",
        p_rss as f64 / 1024.0,
        q_rss as f64 / 1024.0
    );
    let bare_startup = median(startup_bare);
    println!(
        "filters and jail         start to first KVM_RUN {:.2} ms with, {:.2} ms without, ratio {:.3}; spawn to ready {:.2} s with, {:.2} s without, ratio {:.3}   target <= 1.05",
        ms(sorted[sorted.len() / 2]),
        ms(bare_startup),
        sorted[sorted.len() / 2].as_secs_f64() / bare_startup.as_secs_f64(),
        p_ready.as_secs_f64(),
        b_ready.as_secs_f64(),
        p_ready.as_secs_f64() / b_ready.as_secs_f64()
    );
    let per_run = |boots: &[Boot]| {
        boots
            .iter()
            .map(|b| (b.ready.as_secs_f64() * 100.0).round() / 100.0)
            .collect::<Vec<_>>()
    };
    println!(
        "per run (s): peapod {:?}; peapod --no-seccomp, no jail {:?}; qemu {:?}",
        per_run(&peapod),
        per_run(&bare),
        per_run(&qemu)
    );
}
