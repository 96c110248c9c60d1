//! The shim through containerd, at the task level (`ctr`), on a private containerd
//! (src/containerd.rs) with an image the tests build (src/oci_image.rs); every test
//! ends by checking that nothing of the pod is left on the host (src/leftovers.rs).
//!
//! `harness_runs_runc_beside` proves the harness itself with containerd's own runtime
//! (runc); the peapod tests need the shim (`PEAPOD_SHIM`, or target/release), the VMM,
//! the guest kernel and initramfs, root and KVM.

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use peapod_tests::containerd::{
    describe_output, Containerd, ContainerdOptions, PeapodConfig, PodNetns, PEAPOD_RUNTIME,
    POD_IFACE, SHIM_NAME, VMM_NAME,
};
use peapod_tests::leftovers::{assert_no_leftovers, ingress_filters, netns_links, HostState};
use peapod_tests::oci_image::{busybox_image_tar, HELLO_CONTENT};
use peapod_tests::{guest_kernel_release, host_kernel_release, require_kvm, require_root};

/// runc's runtime type, containerd's default.
const RUNC_RUNTIME: &str = "io.containerd.runc.v2";
/// How long a killed task may take to show as STOPPED.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// SIGKILL's exit status (128 + 9).
const KILLED_STATUS: i32 = 137;
/// The port the network tests' containers serve on, and what they answer.
const NC_PORT: u16 = 8080;
const NC_REPLY: &str = "hi-from-the-pod";
/// The CRI annotations that group containers into one pod.
const SANDBOX_ID_ANNOTATION: &str = "io.kubernetes.cri.sandbox-id";
const CONTAINER_TYPE_ANNOTATION: &str = "io.kubernetes.cri.container-type";

/// A private containerd with the test image imported, and the host as it was before
/// the test's pods.
struct Harness {
    ctd: Containerd,
    image: String,
    runtime: &'static str,
    /// `ctr run` options every container of this harness gets.
    run_opts: Vec<String>,
    before: HostState,
    _image_dir: tempfile::TempDir,
}

impl Harness {
    /// With runc only: no shim, kernel or KVM needed.
    fn runc(netns: &[&str]) -> Self {
        require_root();
        Self::new(ContainerdOptions::runc_only(), RUNC_RUNTIME, netns)
    }

    /// With the peapod shim.
    fn peapod(netns: &[&str]) -> Self {
        require_root();
        require_kvm();
        Self::new(ContainerdOptions::peapod(), PEAPOD_RUNTIME, netns)
    }

    /// With the peapod shim and a config changed by `change`.
    fn peapod_with(change: impl FnOnce(&mut PeapodConfig)) -> Self {
        require_root();
        let mut opts = ContainerdOptions::peapod();
        change(
            opts.peapod
                .as_mut()
                .expect("the peapod options have a config"),
        );
        Self::new(opts, PEAPOD_RUNTIME, &[])
    }

    fn new(opts: ContainerdOptions, runtime: &'static str, netns: &[&str]) -> Self {
        let image_dir = tempfile::tempdir().unwrap();
        let ctd = Containerd::start(opts);
        let (tar, reference) = busybox_image_tar(image_dir.path());
        let image = ctd.import(&tar);
        assert_eq!(image, reference, "the image's name after the import");
        let before = HostState::take(&ctd.host_filter(netns));
        // runc keeps its state in /run/containerd/runc/<namespace> unless told: keep it
        // in the private directory, so that parallel runs never share container ids.
        let run_opts = if runtime == RUNC_RUNTIME {
            let root = ctd.root_dir.join("runc");
            vec!["--runc-root".into(), root.to_string_lossy().into_owned()]
        } else {
            Vec::new()
        };
        Harness {
            ctd,
            image,
            runtime,
            run_opts,
            before,
            _image_dir: image_dir,
        }
    }

    /// [`Containerd::retry_platform_faults`] on this harness's containerd.
    fn step<T>(
        &self,
        what: &str,
        step: impl FnMut() -> Result<T, String>,
        undo: impl FnMut(),
    ) -> T {
        self.ctd.retry_platform_faults(what, step, undo)
    }

    /// `ctr run --rm` of `cmd` in container `id`, in the foreground, until it exits
    /// with `status` (see [`Harness::step`]).
    fn run_rm_expecting(&self, id: &str, cmd: &[&str], status: i32) -> Output {
        self.step(
            &format!("ctr run --rm {id}"),
            || {
                let out = self.run_rm(id, cmd);
                match out.status.code() {
                    Some(c) if c == status => Ok(out),
                    _ => Err(describe_output(&out)),
                }
            },
            || {},
        )
    }

    /// `ctr run --rm` of `cmd` in container `id`, in the foreground.
    fn run_rm(&self, id: &str, cmd: &[&str]) -> Output {
        let mut args = vec!["run", "--rm", "--runtime", self.runtime];
        args.extend(as_strs(&self.run_opts));
        args.extend([self.image.as_str(), id]);
        args.extend_from_slice(cmd);
        self.ctd.ctr(&args)
    }

    /// `ctr run -d` of `cmd` in container `id`, with more `ctr run` options in
    /// `extra`; returns once the task is RUNNING.
    fn run_detached(&self, id: &str, extra: &[&str], cmd: &[&str]) {
        let mut args = vec!["run", "-d", "--runtime", self.runtime];
        args.extend(as_strs(&self.run_opts));
        args.extend_from_slice(extra);
        args.push(&self.image);
        args.push(id);
        args.extend_from_slice(cmd);
        self.step(
            &format!("ctr run -d {id}"),
            || {
                self.ctd.ctr_ok(&args);
                match self.ctd.task_status(id) {
                    Some(s) if s == "RUNNING" => Ok(()),
                    s => Err(format!("task {id} is {s:?} after ctr run -d")),
                }
            },
            || {
                self.ctd.delete_task(id);
                self.ctd.ctr_ok(&["container", "delete", id]);
            },
        );
    }

    /// `ctr task exec` of `sh -c script` in `id`: (exit status, stdout).
    fn exec(&self, id: &str, exec_id: &str, script: &str) -> (i32, String) {
        let out = self
            .ctd
            .ctr(&["task", "exec", "--exec-id", exec_id, id, "sh", "-c", script]);
        let code = out.status.code().unwrap_or(-1);
        (code, String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// An exec of `script` that must exit with `status`; its stdout.
    fn exec_expecting(&self, id: &str, exec_id: &str, script: &str, status: i32) -> String {
        self.step(
            &format!("exec {exec_id} in {id} ({script})"),
            || match self.exec(id, exec_id, script) {
                (code, stdout) if code == status => Ok(stdout),
                (code, stdout) => Err(format!("exited {code}; stdout: {stdout}")),
            },
            || {},
        )
    }

    /// An exec that must succeed; its stdout, trimmed.
    fn exec_ok(&self, id: &str, exec_id: &str, script: &str) -> String {
        self.exec_expecting(id, exec_id, script, 0)
            .trim()
            .to_string()
    }

    /// Pauses and resumes `id`, checking `ctr task ls` after each.
    fn pause_resume(&self, id: &str) {
        self.ctd.ctr_ok(&["task", "pause", id]);
        assert_eq!(self.ctd.task_status(id).as_deref(), Some("PAUSED"));
        self.ctd.ctr_ok(&["task", "resume", id]);
        assert_eq!(self.ctd.task_status(id).as_deref(), Some("RUNNING"));
    }

    /// The memory usage `ctr task metrics` reports for `id` (cgroup v1's or v2's).
    fn memory_usage(&self, id: &str) -> u64 {
        let text = self.ctd.ctr_ok(&["task", "metrics", id]);
        // v2: "memory.usage  N"; v1: "memory.usage_in_bytes  N".
        text.lines()
            .find_map(|l| {
                let mut f = l.split_whitespace();
                match (f.next(), f.next()) {
                    (Some("memory.usage" | "memory.usage_in_bytes"), Some(n)) => n.parse().ok(),
                    _ => None,
                }
            })
            .unwrap_or_else(|| panic!("no memory usage in ctr task metrics {id}:\n{text}"))
    }

    /// SIGKILLs task `id`, waits for STOPPED, deletes the task (checking its exit
    /// status) and the container.
    fn kill_and_delete(&self, id: &str) {
        self.ctd.ctr_ok(&["task", "kill", "-s", "SIGKILL", id]);
        self.ctd.wait_task_status(id, "STOPPED", STOP_TIMEOUT);
        assert_eq!(
            self.ctd.delete_task(id),
            KILLED_STATUS,
            "task {id}'s status"
        );
        self.ctd.ctr_ok(&["container", "delete", id]);
    }

    /// Kills and deletes task and container `id`, as far as they exist.
    fn remove(&self, id: &str) {
        let _ = self.ctd.ctr(&["task", "kill", "-s", "SIGKILL", id]);
        let _ = self.ctd.ctr(&["task", "delete", "-f", id]);
        let _ = self.ctd.ctr(&["container", "delete", id]);
    }

    /// The test's end: no container left in containerd, nothing new on the host.
    fn finish(self) {
        assert_eq!(
            self.ctd.containers(),
            Vec::<String>::new(),
            "containers left"
        );
        assert_no_leftovers(&self.before);
    }

    /// The host now, as this harness looks at it.
    fn host_now(&self) -> HostState {
        HostState::take(&self.ctd.host_filter(&[]))
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        // A failed test has been seen failing; do not let it litter the machine.
        if std::thread::panicking() {
            self.ctd.clean_up_after_failure();
        }
    }
}

/// `ctr run` options that put a container into the pod of `sandbox` (CRI's grouping).
fn pod_annotations(sandbox: &str, container_type: &str) -> Vec<String> {
    vec![
        "--annotation".into(),
        format!("{SANDBOX_ID_ANNOTATION}={sandbox}"),
        "--annotation".into(),
        format!("{CONTAINER_TYPE_ANNOTATION}={container_type}"),
    ]
}

fn as_strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// A command serving [`NC_REPLY`] on [`NC_PORT`] to every connection.
fn nc_server() -> Vec<String> {
    [
        "nc",
        "-ll",
        "-p",
        &NC_PORT.to_string(),
        "-e",
        "echo",
        NC_REPLY,
    ]
    .map(String::from)
    .to_vec()
}

fn stdout_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The harness itself, on containerd's own runtime: the image imports and runs, ctr's
/// exit status is the container's, annotations reach the OCI spec, exec, pause, metrics
/// and a pod network work, a detached task lives through a containerd crash, and the
/// leftovers check sees a running shim and nothing once it is gone.
#[test]
fn harness_runs_runc_beside() {
    require_root();
    let net = PodNetns::new();
    let mut h = Harness::runc(&[&net.pod, &net.peer]);

    // The image: both layers, and ctr exits with the container's status.
    let out = h.run_rm("id1", &["cat", "/app/hello.txt"]);
    assert!(out.status.success(), "{}", describe_output(&out));
    assert_eq!(stdout_of(&out), HELLO_CONTENT);
    let out = h.run_rm("id1b", &["sh", "-c", "echo hello; exit 3"]);
    assert_eq!(out.status.code(), Some(3), "{}", describe_output(&out));
    assert_eq!(stdout_of(&out), "hello\n");

    // A detached task with CRI's pod annotations, in the pod's network namespace.
    let mut extra = pod_annotations("r1", "sandbox");
    let with_ns = format!("network:{}", net.pod_path());
    extra.extend(["--with-ns".to_string(), with_ns]);
    h.run_detached("r1", &as_strs(&extra), &as_strs(&nc_server()));
    let info: serde_json::Value =
        serde_json::from_str(&h.ctd.ctr_ok(&["containers", "info", "r1"])).unwrap();
    let annotations = &info["Spec"]["annotations"];
    assert_eq!(annotations[SANDBOX_ID_ANNOTATION], "r1", "{info:#}");
    assert_eq!(
        annotations[CONTAINER_TYPE_ANNOTATION], "sandbox",
        "{info:#}"
    );
    assert_eq!(
        net.read_from_pod(NC_PORT, Duration::from_secs(30)).trim(),
        NC_REPLY
    );

    let (code, stdout) = h.exec("r1", "e1", "echo from-exec; exit 5");
    assert_eq!((code, stdout.as_str()), (5, "from-exec\n"));
    h.pause_resume("r1");
    assert!(h.memory_usage("r1") > 0);

    // The leftovers check sees the running shim.
    let running = h.host_now();
    let shims = running.pids_named("containerd-shim-runc-v2");
    assert_eq!(shims.len(), 1, "runc shims: {shims:?}");
    let seen = running.leaked_since_within(&h.before, Duration::ZERO);
    assert!(
        seen.iter()
            .any(|l| l.starts_with(&format!("process {}:", shims[0]))),
        "the leftovers check misses the running shim: {seen:?}"
    );

    // ... and its rootfs (an overlay of the image's two layers) and its socket.
    let expected = [
        ("mount: ", " - overlay "),
        ("unix socket (file): /run/containerd/s/", ""),
    ];
    for (prefix, part) in expected {
        assert!(
            seen.iter()
                .any(|l| l.starts_with(prefix) && l.contains(part)),
            "the leftovers check misses the running container's {prefix}: {seen:?}"
        );
    }
    let lowers = seen
        .iter()
        .find_map(|l| l.split("lowerdir=").nth(1)?.split(',').next())
        .unwrap_or_else(|| panic!("no overlay lowerdir in {seen:?}"));
    assert_eq!(lowers.split(':').count(), 2, "the image's layers: {lowers}");
    checker_sees_network_changes(&h, &net);

    // containerd crashes and comes back; the shim and the task live on.
    let old_pid = h.ctd.pid();
    h.ctd.restart();
    assert_ne!(h.ctd.pid(), old_pid);
    assert_eq!(h.host_now().pids_named("containerd-shim-runc-v2"), shims);
    assert_eq!(h.ctd.task_status("r1").as_deref(), Some("RUNNING"));
    assert_eq!(h.exec_ok("r1", "e2", "echo after-restart"), "after-restart");

    h.kill_and_delete("r1");
    h.finish();
    drop(net);
}

/// The leftovers check sees what a shim could leave in a pod's namespace: a tap, an
/// ingress qdisc and a tc filter on eth0; and stops seeing them once they are gone.
fn checker_sees_network_changes(h: &Harness, net: &PodNetns) {
    let filter = h.ctd.host_filter(&[&net.pod, &net.peer]);
    let before = HostState::take(&filter);
    let pod = net.pod.as_str();
    let make: [&[&str]; 3] = [
        &[
            "ip",
            "-n",
            pod,
            "tuntap",
            "add",
            "dev",
            "pptesttap",
            "mode",
            "tap",
        ],
        &["tc", "-n", pod, "qdisc", "add", "dev", POD_IFACE, "ingress"],
        &[
            "tc", "-n", pod, "filter", "add", "dev", POD_IFACE, "parent", "ffff:", "protocol",
            "all", "u32", "match", "u8", "0", "0",
        ],
    ];
    for args in make {
        host_cmd(args);
    }
    let seen = HostState::take(&filter).leaked_since_within(&before, Duration::ZERO);
    for what in [
        "interface pptesttap".to_string(),
        format!("{POD_IFACE} ingress filter: "),
        format!("{POD_IFACE} qdisc: qdisc ingress"),
    ] {
        assert!(
            seen.iter().any(|l| l.contains(&what)),
            "the leftovers check misses {what}: {seen:?}"
        );
    }
    host_cmd(&["ip", "-n", pod, "link", "del", "pptesttap"]);
    host_cmd(&["tc", "-n", pod, "qdisc", "del", "dev", POD_IFACE, "ingress"]);
    let left = HostState::take(&filter).leaked_since(&before);
    assert_eq!(left, Vec::<String>::new(), "after removing the probes");
}

/// Runs a host command that must succeed.
fn host_cmd(args: &[&str]) {
    let out = std::process::Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"));
    assert!(out.status.success(), "{args:?}: {}", describe_output(&out));
}

// --- peapod task tests (need the shim) ---

/// (a) A container runs in a VM: the guest's kernel, the image's layers, the exit
/// status through `ctr run`'s own.
#[test]
fn peapod_run_rm_reports_output_and_status() {
    let h = Harness::peapod(&[]);
    let guest = guest_kernel_release();
    assert_ne!(
        guest,
        host_kernel_release(),
        "the test needs a guest kernel unlike the host's"
    );
    let out = h.run_rm_expecting(
        "c1",
        &[
            "sh",
            "-c",
            "echo hello; uname -r; cat /app/hello.txt; exit 3",
        ],
        3,
    );
    assert_eq!(
        stdout_of(&out),
        format!("hello\n{guest}\n{HELLO_CONTENT}"),
        "{}",
        describe_output(&out)
    );
    h.finish();
}

/// (b) A detached task: exec, pause and resume, metrics, kill, delete.
#[test]
fn peapod_detached_task_lifecycle() {
    let h = Harness::peapod(&[]);
    h.run_detached("c2", &[], &["sleep", "1000"]);
    let stdout = h.exec_expecting("c2", "e1", "echo from-exec; exit 5", 5);
    assert_eq!(stdout, "from-exec\n");
    // stdin reaches the exec, and its end (ctr's CloseIO) ends the exec's input.
    let echoed = h.step(
        "exec e2 in c2 with stdin",
        || {
            let out = h.ctd.ctr_with_stdin(
                &[
                    "task",
                    "exec",
                    "--exec-id",
                    "e2",
                    "c2",
                    "sh",
                    "-c",
                    "cat; echo eof",
                ],
                b"ping\n",
            );
            match out.status.code() {
                Some(0) => Ok(stdout_of(&out)),
                _ => Err(describe_output(&out)),
            }
        },
        || {},
    );
    assert_eq!(echoed, "ping\neof\n");
    h.pause_resume("c2");
    assert!(h.memory_usage("c2") > 0);
    h.kill_and_delete("c2");
    h.finish();
}

/// (c) Two containers grouped by CRI's annotations share one VM.
#[test]
fn peapod_two_containers_share_one_vm() {
    let h = Harness::peapod(&[]);
    // The host's fault may also kill the sandbox's process a moment after it started:
    // then the pod is made again.
    h.step(
        "the pod sb1 with c3",
        || {
            h.run_detached(
                "sb1",
                &as_strs(&pod_annotations("sb1", "sandbox")),
                &["sleep", "1000"],
            );
            h.run_detached(
                "c3",
                &as_strs(&pod_annotations("sb1", "container")),
                &["sleep", "1000"],
            );
            match h.ctd.task_status("sb1") {
                Some(s) if s == "RUNNING" => Ok(()),
                s => Err(format!("the sandbox is {s:?} after c3 started")),
            }
        },
        || {
            for id in ["c3", "sb1"] {
                h.remove(id);
            }
        },
    );
    let now = h.host_now();
    assert_eq!(now.pids_named(VMM_NAME).len(), 1, "VMMs for one pod");
    assert_eq!(now.pids_named(SHIM_NAME).len(), 1, "shims for one pod");

    let boot_id = "cat /proc/sys/kernel/random/boot_id";
    let sandbox_boot = h.exec_ok("sb1", "b1", boot_id);
    let container_boot = h.exec_ok("c3", "b2", boot_id);
    assert_eq!(
        sandbox_boot, container_boot,
        "both containers see one kernel"
    );
    let host_boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    assert_ne!(
        sandbox_boot,
        host_boot.trim(),
        "the containers' kernel is the host's"
    );

    h.kill_and_delete("c3");
    h.kill_and_delete("sb1");
    h.finish();
}

/// (d) containerd crashes and comes back while a pod runs: the pod and its shim live
/// on, and containerd can still exec. Then the shim is killed: containerd's cleanup
/// leaves nothing of the pod.
#[test]
fn peapod_task_survives_containerd_restart() {
    let mut h = Harness::peapod(&[]);
    h.run_detached("c4", &[], &["sleep", "1000"]);
    let vmms = h.host_now().pids_named(VMM_NAME);
    assert_eq!(vmms.len(), 1, "VMMs for one pod");
    h.ctd.restart();
    assert_eq!(h.ctd.task_status("c4").as_deref(), Some("RUNNING"));
    assert_eq!(h.host_now().pids_named(VMM_NAME), vmms, "the VMM lives on");
    assert_eq!(h.exec_ok("c4", "e1", "echo after-restart"), "after-restart");

    // Then the shim is killed (SIGKILL, as a crash or the OOM killer): its VMM dies
    // with it, containerd sees the task end and runs the shim binary's `delete` on the
    // bundle, and once the task and container are deleted nothing of the pod is left
    // (`finish`: processes, mounts, taps, cgroups, files).
    let shims = h.host_now().pids_named("containerd-shim");
    assert_eq!(shims.len(), 1, "one shim for one pod: {shims:?}");
    // SAFETY: kill(2) of the pod's shim, a process of this test's containerd.
    assert_eq!(unsafe { libc::kill(shims[0], libc::SIGKILL) }, 0);
    let deadline = Instant::now() + STOP_TIMEOUT;
    while h.ctd.task_status("c4").as_deref() == Some("RUNNING") {
        assert!(
            Instant::now() < deadline,
            "task c4 still RUNNING {STOP_TIMEOUT:?} after its shim was killed\n{}",
            h.ctd.log_tail()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = h.ctd.ctr(&["task", "delete", "c4"]);
    h.ctd.ctr_ok(&["container", "delete", "c4"]);
    h.finish();
}

/// (e) The pod's VMM runs jailed (its own uid, no capabilities, rlimits, a root that
/// holds only its files: not /etc/shadow, not containerd's state), in a cgroup of its
/// own, and filtered. A vCPU
/// thread then makes a system call outside its seccomp filter (as a guest that took it
/// over would): the VMM dies of SIGSYS, the task stops with a failure status, and the
/// shim's log says why.
#[test]
fn peapod_jailed_vmm_killed_by_its_filter_stops_task() {
    require_root();
    let h = Harness::peapod(&[]);
    h.run_detached("c5", &[], &["sleep", "1000"]);
    let vmms = h.host_now().pids_named(VMM_NAME);
    assert_eq!(vmms.len(), 1, "VMMs for one pod");
    peapod_tests::jail::assert_jailed(
        vmms[0],
        &[Path::new("/etc/shadow"), &h.ctd.root_dir, &h.ctd.state_dir],
    );
    let cgroup = peapod_tests::jail::cgroup_of(vmms[0]);
    peapod_tests::threads::assert_all_filtered(vmms[0]);
    let vcpu = peapod_tests::threads::thread_named(vmms[0], "vcpu0");
    let outcome = peapod_tests::threads::make_thread_call(
        vcpu,
        libc::SYS_socket,
        [libc::AF_INET as u64, libc::SOCK_STREAM as u64, 0],
        STOP_TIMEOUT,
    );
    assert_eq!(
        outcome,
        peapod_tests::threads::CallOutcome::Killed(libc::SIGSYS)
    );
    h.ctd.wait_task_status("c5", "STOPPED", STOP_TIMEOUT);
    let status = h.ctd.delete_task("c5");
    assert_ne!(status, 0, "a task whose VM died reports success");
    assert!(
        h.ctd.log_contains("outside its seccomp filter"),
        "the shim does not say why the VMM died:\n{}",
        h.ctd.log_tail()
    );
    h.ctd.ctr_ok(&["container", "delete", "c5"]);
    peapod_tests::jail::assert_cgroup_gone(&cgroup);
    h.finish();
}

/// (f) A pod in a network namespace answers from its address, and leaves the
/// namespace as it found it: no tap, no tc filters on eth0.
#[test]
fn peapod_pod_network_namespace() {
    require_root();
    let net = PodNetns::new();
    let h = Harness::peapod(&[&net.pod, &net.peer]);
    let with_ns = format!("network:{}", net.pod_path());
    h.run_detached("c6", &["--with-ns", &with_ns], &as_strs(&nc_server()));
    assert_eq!(
        net.read_from_pod(NC_PORT, Duration::from_secs(60)).trim(),
        NC_REPLY
    );
    h.kill_and_delete("c6");
    let mut links = netns_links(&net.pod);
    links.sort();
    assert_eq!(links, [POD_IFACE, "lo"], "interfaces in the pod namespace");
    assert_eq!(
        ingress_filters(&net.pod, POD_IFACE),
        Vec::<String>::new(),
        "tc filters on {POD_IFACE}"
    );
    h.finish();
    drop(net);
}

/// Bad input fails the task with an error that names the object and the fix, and
/// leaves nothing behind: a missing guest kernel, and a pod on the host's network.
/// (h) Templates: the first pod boots and leaves its kind's template, the second
/// starts from it (its clock is the host's), and a damaged template is removed and
/// its pod boots.
#[test]
fn peapod_pods_start_from_a_template() {
    require_kvm();
    let templates = tempfile::tempdir().unwrap();
    let dir = templates.path().to_path_buf();
    let h = Harness::peapod_with(|c| {
        c.extra.push("templates = true".into());
        c.extra
            .push(format!("template_dir = {:?}", dir.display().to_string()));
    });
    let made = || -> Vec<std::path::PathBuf> {
        std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.join("vm.state").is_file())
            .collect()
    };
    let started = std::time::Instant::now();
    let out = h.run_rm_expecting("t1", &["sh", "-c", "echo one"], 0);
    let booted = started.elapsed();
    assert_eq!(stdout_of(&out), "one\n", "{}", describe_output(&out));
    let template = made();
    assert_eq!(
        template.len(),
        1,
        "the first pod left a template: {template:?}"
    );
    let template = template[0].clone();
    assert!(h.ctd.log_contains("template"), "{}", h.ctd.log_tail());

    let started = std::time::Instant::now();
    let out = h.run_rm_expecting("t2", &["sh", "-c", "echo two; date +%s"], 0);
    eprintln!(
        "figures: ctr run --rm, VM booted (and template made) {:.1} s, VM from the \
         template {:.1} s",
        booted.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    let text = stdout_of(&out);
    let (first, guest_now) = text.split_once('\n').expect("two lines");
    assert_eq!(first, "two", "{}", describe_output(&out));
    let host_now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let guest_now: i64 = guest_now.trim().parse().expect("date +%s");
    assert!(
        (host_now - guest_now).abs() < 600,
        "the restored guest's clock is the host's: {guest_now} against {host_now}"
    );
    let restored = format!("from template {}", template.display());
    assert!(h.ctd.log_contains(&restored), "{}", h.ctd.log_tail());

    // A damaged template: removed, and its pod boots.
    let state = template.join("vm.state");
    let mut bytes = std::fs::read(&state).unwrap();
    let last = bytes.len() - 2;
    bytes[last] ^= 1;
    std::fs::remove_file(&state).unwrap();
    std::fs::write(&state, bytes).unwrap();
    let out = h.run_rm_expecting("t3", &["sh", "-c", "echo three"], 0);
    assert_eq!(stdout_of(&out), "three\n", "{}", describe_output(&out));
    assert!(!template.exists(), "the damaged template is gone");
    assert!(
        h.ctd.log_contains("it is removed, and the pod boots"),
        "{}",
        h.ctd.log_tail()
    );
    h.finish();
}

#[test]
fn peapod_bad_input_is_refused_by_name() {
    let h = Harness::peapod_with(|c| c.kernel = Some("/nonexistent/peapod/vmlinux".into()));
    let out = h.run_rm("bad1", &["true"]);
    let text = describe_output(&out);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("/nonexistent/peapod/vmlinux") && text.contains("does not exist"),
        "the error does not name the missing kernel: {text}"
    );
    let out = h.ctd.ctr(&[
        "run",
        "--rm",
        "--net-host",
        "--runtime",
        PEAPOD_RUNTIME,
        &h.image,
        "bad2",
        "true",
    ]);
    let text = describe_output(&out);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("host's network") && text.contains("bad2"),
        "the error does not say why a host-network pod is refused: {text}"
    );
    // ctr run --rm leaves the container record when the task never started.
    for id in ["bad1", "bad2"] {
        let _ = h.ctd.ctr(&["container", "delete", id]);
    }
    h.finish();
}
