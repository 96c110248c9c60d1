//! Pods over CRI, peapod against runc on the same containerd in the same run
//! (src/kubelet.rs plays the kubelet):
//!
//! - pod start latency: from RunPodSandbox called to the container's first line in its
//!   CRI log, for a busybox `echo` container; runc and peapod rounds alternate
//!   (`PEAPOD_BENCH_RUNS`, default 3), medians;
//! - memory of idle pods, with 1, 2 and 4 of them: the PSS of the shims and the VMMs
//!   (PSS shares a page among the processes that map it, so the sum is what the pods
//!   cost together), the VMM's RSS outside guest RAM, and the idle CPU of shim and VMM;
//! - the per-pod overhead to declare in the RuntimeClass (`overhead.podFixed`): the
//!   guest memory the shim adds to a pod's limit plus what its shim and VMM hold outside
//!   guest RAM;
//! - `kubectl port-forward`: time to the first byte and throughput of a 16 MiB HTTP
//!   transfer through CRI's port-forward, against the same transfer from the host to
//!   the pod IP, for a peapod pod and a runc pod (`PEAPOD_BENCH_RUNS` rounds, medians);
//! - probes: `PEAPOD_BENCH_PROBES` ExecSyncs in a row (default 1,000, as the kubelet's
//!   liveness and readiness probes make them over a pod's life), for a peapod pod and
//!   a runc pod: p50 and p99 of one, and the shim's and VMM's descriptors and PSS and
//!   the guest's open files and its agent's RSS before and after (an exec kept by the
//!   shim or the agent after it was waited for would move them).
//!
//! `make bench`, or `cargo bench -p peapod-tests --bench cri` as root with the artefacts
//! in the environment (as `make test` sets them).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use peapod_tests::cpu_time_of;
use peapod_tests::cri::{port_forward_stream, PEAPOD_HANDLER};
use peapod_tests::kubelet::{ContainerSpec, Node, Pod};
use peapod_tests::leftovers::HostState;
use peapod_tests::memory::{pss_kib, rss_outside_guest_kib};
use peapod_tests::oci_image::{pseudo_random, www_image_tar, WWW_DIR};

const SHIM: &str = "containerd-shim-peapod-v2";
const RUNC_SHIM: &str = "containerd-shim-runc-v2";
const VMM: &str = "peapod-vmm";
/// What the shim adds to a pod's memory limit for the guest kernel and agent
/// (`memory_overhead_mib`'s default, shim/src/config.rs).
const GUEST_OVERHEAD_MIB: u64 = 64;
/// How long idle pods are watched for their CPU use.
const IDLE_WINDOW: Duration = Duration::from_secs(10);
/// The port-forward transfer: a file of this size from a busybox httpd on this port.
const TRANSFER_BYTES: usize = 16 << 20;
const HTTP_PORT: u16 = 8090;
const WWW_IMAGE: &str = "docker.io/peapod/www:bench";
const GET_BIG: &[u8] = b"GET /big HTTP/1.0\r\nHost: localhost\r\n\r\n";

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn handler_name(handler: &str) -> &str {
    if handler.is_empty() {
        "runc"
    } else {
        handler
    }
}

/// RunPodSandbox to the first output of an `echo` container; the pod is removed after.
fn start_latency(node: &Node, handler: &str, round: usize) -> Duration {
    let name = format!("start-{}-{round}", handler_name(handler));
    let t0 = Instant::now();
    let pod = node.run_pod(&name, handler);
    let c = node.run_container(&pod, &ContainerSpec::shell("echo", "echo first-output"));
    node.wait_log(&c, "first-output");
    let took = t0.elapsed();
    node.remove_pod(&pod);
    took
}

/// The memory and CPU of a node's shims and VMMs, summed.
#[derive(Default)]
struct PodCost {
    shim_pss_kib: u64,
    vmm_pss_kib: u64,
    vmm_outside_guest_kib: u64,
    cpu: Duration,
}

/// The VMM's guest size, from its `--memory <MiB>` argument.
fn guest_bytes(pid: i32) -> u64 {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let mib: u64 = args
        .windows(2)
        .find(|w| w[0] == "--memory")
        .and_then(|w| w[1].parse().ok())
        .unwrap_or_else(|| panic!("VMM {pid}: no --memory in {args:?}"));
    mib << 20
}

fn measure(node: &Node, shim_name: &str) -> PodCost {
    let host = HostState::take(&node.host_filter());
    let shims = host.pids_named(shim_name);
    let vmms = host.pids_named(VMM);
    let cpu_of = |pids: &[i32]| pids.iter().map(|p| cpu_time_of(*p)).sum::<Duration>();
    let cpu0 = cpu_of(&shims) + cpu_of(&vmms);
    std::thread::sleep(IDLE_WINDOW);
    let cpu = cpu_of(&shims) + cpu_of(&vmms) - cpu0;
    PodCost {
        shim_pss_kib: shims.iter().map(|p| pss_kib(*p)).sum(),
        vmm_pss_kib: vmms.iter().map(|p| pss_kib(*p)).sum(),
        vmm_outside_guest_kib: vmms
            .iter()
            .map(|p| rss_outside_guest_kib(*p as u32, guest_bytes(*p)).0)
            .sum(),
        cpu,
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Time to the first byte and the whole transfer of one answer to `GET_BIG`.
#[derive(Clone, Copy)]
struct Transfer {
    first_byte: Duration,
    total: Duration,
}

/// `GET_BIG` from the host straight to `addr` (the pod IP).
fn direct(addr: SocketAddr) -> Transfer {
    let t0 = Instant::now();
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    s.write_all(GET_BIG).unwrap();
    let mut buf = vec![0u8; 256 << 10];
    let (mut got, mut first) = (0usize, None);
    loop {
        let n = s.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        first.get_or_insert_with(|| t0.elapsed());
        got += n;
    }
    assert!(got > TRANSFER_BYTES, "{addr}: {got} bytes");
    Transfer {
        first_byte: first.unwrap(),
        total: t0.elapsed(),
    }
}

/// `GET_BIG` through CRI's port-forward to `HTTP_PORT` of `pod` (the URL is asked for
/// first and not timed: kubectl holds its stream open across connections).
fn forwarded(node: &Node, pod: &Pod) -> Transfer {
    let url = node.port_forward_url(pod, HTTP_PORT);
    let t0 = Instant::now();
    let f = port_forward_stream(&url, HTTP_PORT, GET_BIG, Duration::from_secs(300))
        .unwrap_or_else(|e| panic!("pod {}: {e}", pod.name));
    assert!(f.data.len() > TRANSFER_BYTES, "pod {}: {f:?}", pod.name);
    Transfer {
        first_byte: f.first_byte.unwrap(),
        total: t0.elapsed(),
    }
}

/// Port-forward against the pod IP, for each handler, rounds alternating.
fn port_forward_figures(node: &Node, runs: usize) {
    let big = pseudo_random(TRANSFER_BYTES, 16);
    let (tar, image) = www_image_tar(node.scratch_dir(), WWW_IMAGE, &[("big", &big)]);
    node.import_image(&tar, image);
    let port = HTTP_PORT.to_string();
    let serve =
        ContainerSpec::new("httpd", &["httpd", "-f", "-p", &port, "-h", WWW_DIR]).image(image);
    let pods: Vec<(&str, Pod)> = ["", PEAPOD_HANDLER]
        .into_iter()
        .map(|h| {
            let pod = node.run_pod(&format!("forward-{}", handler_name(h)), h);
            let c = node.run_container(&pod, &serve);
            node.exec_ok(
                &c,
                &format!(
                    "until wget -q -O /dev/null http://127.0.0.1:{HTTP_PORT}/big; do sleep 0.2; done"
                ),
            );
            (handler_name(h), pod)
        })
        .collect();
    let mut rows: BTreeMap<(&str, &str), Vec<Transfer>> = BTreeMap::new();
    for _ in 0..runs {
        for (name, pod) in &pods {
            let ip = node.pod_ip(pod);
            rows.entry((name, "pod IP"))
                .or_default()
                .push(direct((ip, HTTP_PORT).into()));
            rows.entry((name, "port-forward"))
                .or_default()
                .push(forwarded(node, pod));
        }
    }
    println!(
        "\nkubectl port-forward: a {} MiB HTTP transfer (median of {runs}):",
        TRANSFER_BYTES >> 20
    );
    println!("  pod    | path         | first byte | whole      | throughput");
    for ((name, path), t) in &rows {
        let first = median(t.iter().map(|t| t.first_byte).collect());
        let total = median(t.iter().map(|t| t.total).collect());
        println!(
            "  {name:6} | {path:12} | {first:>10.2?} | {total:>10.2?} | {:6.1} MiB/s",
            (TRANSFER_BYTES >> 20) as f64 / total.as_secs_f64()
        );
    }
    for (_, pod) in &pods {
        node.remove_pod(pod);
    }
}

/// Descriptors and PSS (KiB) of the processes named `names`, summed.
fn fds_and_pss(node: &Node, names: &[&str]) -> (usize, u64) {
    let host = HostState::take(&node.host_filter());
    let pids: Vec<i32> = names.iter().flat_map(|n| host.pids_named(n)).collect();
    let fds = pids
        .iter()
        .map(|p| std::fs::read_dir(format!("/proc/{p}/fd")).map_or(0, |d| d.count()))
        .sum();
    (fds, pids.iter().map(|p| pss_kib(*p)).sum())
}

/// `probes` ExecSyncs of `true` in one pod of each handler; prints latency percentiles
/// and what the node and the guest hold before and after.
fn probe_figures(node: &Node, probes: usize) {
    println!(
        "
probes: {probes} ExecSyncs of `true` in a row, one pod each"
    );
    println!("  pod    | p50      | p99      | shim(+VMM) fds | shim(+VMM) PSS MiB | guest");
    for handler in ["", PEAPOD_HANDLER] {
        let name = handler_name(handler);
        let pod = node.run_pod(&format!("probes-{name}"), handler);
        let c = node.run_container(&pod, &ContainerSpec::new("sleeper", &["sleep", "86400"]));
        let names: &[&str] = if handler.is_empty() {
            &[RUNC_SHIM]
        } else {
            &[SHIM, VMM]
        };
        // In the guest: open files, and the agent's (PID 1's) resident set.
        let guest = || -> String {
            if handler.is_empty() {
                return "-".into();
            }
            node.exec_ok(
                &c,
                "cut -f1 /proc/sys/fs/file-nr; grep VmRSS /proc/1/status | tr -s ' ' | cut -d' ' -f2",
            )
            .replace('\n', " files, agent RSS ")
        };
        node.exec_ok(&c, "true");
        let (fds0, pss0) = fds_and_pss(node, names);
        let guest0 = guest();
        let mut took = Vec::with_capacity(probes);
        for i in 0..probes {
            let t0 = Instant::now();
            node.exec_ok(&c, "true");
            took.push(t0.elapsed());
            if (i + 1) % 100 == 0 {
                eprintln!("{name}: {} probes", i + 1);
            }
        }
        let (fds1, pss1) = fds_and_pss(node, names);
        let guest1 = guest();
        took.sort();
        let p99 = took[(took.len() * 99 / 100).min(took.len() - 1)];
        println!(
            "  {name:6} | {:8.2?} | {p99:8.2?} | {fds0} -> {fds1} | {:.1} -> {:.1} | {guest0} / {guest1}",
            took[took.len() / 2],
            mib(pss0),
            mib(pss1),
        );
        node.remove_pod(&pod);
    }
    println!("  (guest: open files and the agent's RSS in KiB, before / after)");
}

fn main() {
    let runs: usize = std::env::var("PEAPOD_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let probes: usize = std::env::var("PEAPOD_BENCH_PROBES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let node = Node::start();

    port_forward_figures(&node, runs);
    probe_figures(&node, probes);

    // Start latency, rounds alternating so that both see the same machine.
    let mut times: BTreeMap<&str, Vec<Duration>> = BTreeMap::new();
    for round in 0..runs {
        for handler in ["", PEAPOD_HANDLER] {
            let t = start_latency(&node, handler, round);
            eprintln!("round {round}: {}: {t:.2?}", handler_name(handler));
            times.entry(handler_name(handler)).or_default().push(t);
        }
    }
    let runc = median(times["runc"].clone());
    let peapod = median(times[PEAPOD_HANDLER].clone());
    println!("pod start, RunPodSandbox to the container's first output (median of {runs}):");
    println!("  runc    {runc:.2?}  {:.2?}", times["runc"]);
    println!("  peapod  {peapod:.2?}  {:.2?}", times[PEAPOD_HANDLER]);
    println!(
        "  ratio peapod / runc: {:.1}",
        peapod.as_secs_f64() / runc.as_secs_f64()
    );

    // Idle pods: 1, then 2, then 4 of each handler.
    println!("\nidle pods (a `sleep` container each); PSS summed over the pods' processes:");
    println!("  pods | runc shims | peapod shims | peapod VMMs (all) | VMMs outside guest RAM | shim+VMM CPU idle");
    let (mut overhead_kib, mut overhead_mcpu) = (0, 0.0f64);
    for handler in ["", PEAPOD_HANDLER] {
        let mut pods: Vec<Pod> = Vec::new();
        let mut rows = Vec::new();
        for n in [1usize, 2, 4] {
            while pods.len() < n {
                let name = format!("idle-{}-{}", handler_name(handler), pods.len());
                let pod = node.run_pod(&name, handler);
                node.run_container(&pod, &ContainerSpec::new("sleep", &["sleep", "3600"]));
                pods.push(pod);
            }
            // Let the newest guest finish starting its container.
            std::thread::sleep(Duration::from_secs(5));
            let shim = if handler.is_empty() { RUNC_SHIM } else { SHIM };
            rows.push((n, measure(&node, shim)));
        }
        for (n, c) in &rows {
            let per = |kib: u64| format!("{:6.2} MiB ({:5.2}/pod)", mib(kib), mib(kib) / *n as f64);
            let cpu_ms = c.cpu.as_secs_f64() * 1000.0 / IDLE_WINDOW.as_secs_f64();
            if handler.is_empty() {
                println!("  {n:4} | {} |", per(c.shim_pss_kib));
            } else {
                println!(
                    "  {n:4} | {:>25} | {} | {} | {} | {:.0} mCPU ({:.0}/pod)",
                    "",
                    per(c.shim_pss_kib),
                    per(c.vmm_pss_kib),
                    per(c.vmm_outside_guest_kib),
                    cpu_ms,
                    cpu_ms / *n as f64
                );
                overhead_kib =
                    overhead_kib.max((c.shim_pss_kib + c.vmm_outside_guest_kib) / *n as u64);
                overhead_mcpu = overhead_mcpu.max(cpu_ms / *n as f64);
            }
        }
        for pod in &pods {
            node.remove_pod(pod);
        }
    }
    let fixed_mib = GUEST_OVERHEAD_MIB + overhead_kib.div_ceil(1024);
    // Rounded up to the next 50 millicores.
    let fixed_mcpu = (overhead_mcpu / 50.0).ceil() as u64 * 50;
    println!(
        "\nper-pod overhead for the RuntimeClass: {GUEST_OVERHEAD_MIB} MiB guest overhead + \
         {:.1} MiB shim and VMM outside guest RAM -> overhead.podFixed.memory: {fixed_mib}Mi; \
         idle shim + VMM CPU {overhead_mcpu:.0} mCPU a pod at most -> overhead.podFixed.cpu: \
         {fixed_mcpu}m",
        mib(overhead_kib)
    );
    node.finish();
}
