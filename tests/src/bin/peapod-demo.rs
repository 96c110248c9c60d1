//! `make demo`: a pod in a microVM, the way Kubernetes asks for one. Starts a private
//! containerd with the CRI plugin, a CNI bridge network and the peapod runtime (as
//! `tests/tests/cri.rs` does), runs a pod with `runtime_handler: "peapod"` and a
//! container with a 128 MiB memory limit, prints what the container sees, and removes
//! the pod, checking that nothing of it is left on the host.
//!
//! Runs as root on a machine with KVM; the artefacts come from the environment
//! (`PEAPOD_KERNEL`, `PEAPOD_INITRD`, `PEAPOD_VMM`, `PEAPOD_SHIM`), as `make demo`
//! sets them.

use std::time::Instant;

use peapod_tests::cri::PEAPOD_HANDLER;
use peapod_tests::host_kernel_release;
use peapod_tests::kubelet::{ContainerSpec, Node};

/// What the demo's container prints about itself.
const REPORT: &str = r#"echo "kernel:       $(uname -r)"
echo "ip:           $(ip -4 -o addr show eth0 | awk '{print $4}')"
p=$(sed -n 's/^0:://p' /proc/self/cgroup)
echo "memory limit: $(cat /sys/fs/cgroup$p/memory.max 2>/dev/null || cat /sys/fs/cgroup/memory.max)"
echo "cpus:         $(nproc)"
echo demo-done
exec sleep 3600"#;

fn main() {
    let t0 = Instant::now();
    println!("peapod demo: starting a private containerd with CRI, CNI and peapod");
    let node = Node::start();
    println!(
        "peapod demo: RunPodSandbox (runtime_handler \"{PEAPOD_HANDLER}\"): booting the pod's VM"
    );
    let pod = node.run_pod("demo", PEAPOD_HANDLER);
    println!("peapod demo: pod {} has IP {}", pod.id, node.pod_ip(&pod));
    let spec = ContainerSpec::shell("report", REPORT).memory_limit(128 << 20);
    let c = node.run_container(&pod, &spec);
    let log = node.wait_log(&c, "demo-done");
    println!(
        "peapod demo: the container's output ({:.1?} after RunPodSandbox was called; the host runs {}):",
        t0.elapsed(),
        host_kernel_release()
    );
    for (_, line) in log.iter().filter(|(_, l)| l != "demo-done") {
        println!("    {line}");
    }
    println!("peapod demo: removing the pod");
    node.remove_pod(&pod);
    node.finish();
    println!("peapod demo: done; nothing of the pod is left on the host");
}
