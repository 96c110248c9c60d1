//! Whether what a pod asks for fits the node: a VM's memory is the node's memory, so a
//! pod (or one of its containers) whose limit is larger than the node can never have
//! it. Such a pod is refused before anything is made, with the numbers and the fix,
//! rather than booted and OOM-killed later (or, for a huge limit, never booted: the
//! guest kernel sets up its memory map for all of it).

use crate::config::Config;
use crate::error::{Result, ShimError};
use crate::spec::OciSpec;

const MIB: u64 = 1 << 20;

/// The node's memory in MiB (`MemTotal` of /proc/meminfo); `None` if unreadable.
pub fn node_memory_mib() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    mem_total_mib(&meminfo)
}

fn mem_total_mib(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

/// Refuses task `id` if its VM (for the pod's first task: the pod's limits plus the
/// VM's overhead, [`Config::vm_size`]) or its own memory limit is larger than
/// `node_mib`.
pub fn check_fits_node(
    config: &Config,
    spec: &OciSpec,
    id: &str,
    sandbox_id: &str,
    is_sandbox: bool,
    node_mib: u64,
) -> Result<()> {
    let mut asks = Vec::new();
    if is_sandbox {
        let vm = config.vm_size(&spec.annotations()).memory_mib;
        asks.push((
            format!(
                "its VM (the pod's memory limits plus the VM's overhead of {} MiB)",
                config.memory_overhead_mib
            ),
            vm,
        ));
    }
    if let Some(limit) = spec.memory_limit() {
        asks.push((
            format!("container {}", spec.container_display_name(id)),
            limit.div_ceil(MIB),
        ));
    }
    match asks.into_iter().find(|(_, mib)| *mib > node_mib) {
        None => Ok(()),
        Some((what, asked_mib)) => Err(ShimError::LargerThanNode {
            pod: spec.pod_display_name(sandbox_id),
            what,
            asked_mib,
            node_mib,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(annotations: serde_json::Value, limit: Option<i64>) -> OciSpec {
        let mut json = json!({
            "ociVersion": "1.0.2",
            "root": {"path": "rootfs"},
            "process": {"cwd": "/", "args": ["sh"], "user": {"uid": 0, "gid": 0}},
            "annotations": annotations,
            "linux": {},
        });
        if let Some(limit) = limit {
            json["linux"]["resources"] = json!({"memory": {"limit": limit}});
        }
        OciSpec::parse(&serde_json::to_vec(&json).unwrap()).unwrap()
    }

    #[test]
    fn mem_total_is_read_in_mib() {
        let meminfo = "MemTotal:       24600000 kB\nMemFree:         1000 kB\n";
        assert_eq!(mem_total_mib(meminfo), Some(24023));
        assert_eq!(mem_total_mib("MemFree: 1 kB\n"), None);
        assert!(node_memory_mib().is_some_and(|m| m > 0));
    }

    #[test]
    fn a_limit_larger_than_the_node_is_refused_naming_pod_and_container() {
        let config = Config::default();
        let app = spec(
            json!({
                "io.kubernetes.cri.container-type": "container",
                "io.kubernetes.cri.sandbox-id": "0123456789abcdef0123",
                "io.kubernetes.cri.sandbox-name": "web",
                "io.kubernetes.cri.sandbox-namespace": "shop",
                "io.kubernetes.cri.container-name": "app",
            }),
            Some(3 << 30),
        );
        let e =
            check_fits_node(&config, &app, "c1", "0123456789abcdef0123", false, 2048).unwrap_err();
        assert_eq!(
            e.to_string(),
            "pod shop/web (sandbox 0123456789ab): container app asks for 3072 MiB of memory, \
             more than this node has (2048 MiB): a pod's VM cannot be larger than its node; \
             lower the limit (resources.limits.memory) or run the pod on a node with more \
             memory"
        );
        check_fits_node(&config, &app, "c1", "0123456789abcdef0123", false, 4096)
            .expect("3 GiB fits a 4 GiB node");

        // The sandbox: its VM is the pod's limits plus the overhead.
        let sandbox = spec(
            json!({
                "io.kubernetes.cri.container-type": "sandbox",
                "io.kubernetes.cri.sandbox-memory": (4096u64 << 20).to_string(),
            }),
            None,
        );
        let e = check_fits_node(&config, &sandbox, "sb", "sb", true, 4096).unwrap_err();
        let text = e.to_string();
        assert!(
            text.starts_with(&format!(
                "pod sb: its VM (the pod's memory limits plus the VM's overhead of {} MiB) \
                 asks for {} MiB",
                config.memory_overhead_mib,
                4096 + config.memory_overhead_mib
            )),
            "{text}"
        );
        // No limits: the default size, which fits.
        let plain = spec(json!({}), None);
        check_fits_node(&config, &plain, "c", "c", true, 4096).unwrap();
    }
}
