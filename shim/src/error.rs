//! What can go wrong in a pod, in the shim's own terms. Each message names the task or
//! pod, the cause and, where there is one, the fix; it reaches containerd's log as it
//! is. The one conversion to containerd's wire error (a ttrpc status code) is at the
//! task service's edge (`service.rs`).

use std::io;
use std::path::PathBuf;

use containerd_shim_protos::ttrpc;

use crate::spec::SpecError;
use crate::vmm::VmmError;
use crate::volumes::VolumeError;

pub type Result<T, E = ShimError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    // What containerd asked does not fit the task's state.
    #[error("task {id} not found (deleted already, or never created in this pod)")]
    TaskNotFound { id: String },
    #[error("exec {exec_id} of task {id} not found (deleted already, or never added)")]
    ExecNotFound { id: String, exec_id: String },
    #[error("task {id} already exists")]
    TaskExists { id: String },
    #[error("exec {exec_id} in task {id} already exists")]
    ExecExists { id: String, exec_id: String },
    #[error("exec {exec_id} in task {id}: the task has exited")]
    ExecInExited { id: String, exec_id: String },
    #[error("{what}: already started")]
    AlreadyStarted { what: String },
    #[error("{what}: process already finished")]
    AlreadyFinished { what: String },
    #[error("{what} is still running (kill it first)")]
    StillRunning { what: String },
    #[error("task {id} is the pod's sandbox; delete its other containers first: {}", .others.join(", "))]
    SandboxNotLast { id: String, others: Vec<String> },
    #[error("task {id} was deleted")]
    Deleted { id: String },

    // The pod's VM.
    #[error("task {id}: the pod's VM is not running")]
    VmNotRunning { id: String },
    #[error("task {id}: the VM of pod {pod} has exited")]
    VmExited { id: String, pod: String },
    #[error("task {id}: the pod {pod} is being removed")]
    PodStopping { id: String, pod: String },
    #[error(
        "pod {pod}: {} does not exist (build it with make install, or set kernel/initrd in \
         the peapod config)",
        .path.display()
    )]
    MissingBootFile { pod: String, path: PathBuf },
    #[error(
        "pod {pod}: {what} asks for {asked_mib} MiB of memory, more than this node has \
         ({node_mib} MiB): a pod's VM cannot be larger than its node; lower the limit \
         (resources.limits.memory) or run the pod on a node with more memory"
    )]
    LargerThanNode {
        pod: String,
        what: String,
        asked_mib: u64,
        node_mib: u64,
    },
    #[error(
        "pod {pod}: it uses the host's network (hostNetwork: true, or no network namespace \
         in its spec); a VM pod has its own network stack: run it with another \
         RuntimeClass or without host networking"
    )]
    HostNetwork { pod: String },
    #[error("pod {pod}: {step}: {cause}{}", vmm_log_note(.vmm_log))]
    Boot {
        pod: String,
        step: String,
        cause: String,
        /// The end of the VMM's log, once the VMM has run.
        vmm_log: Option<String>,
    },
    #[error("{what}: {source}")]
    Vmm { what: String, source: VmmError },
    #[error("{what}: {}", agent_cause(.source))]
    Agent {
        what: String,
        /// The agent client's error: its status code is the agent's answer.
        source: ttrpc::Error,
    },

    // A container's parts on the host.
    #[error("task {id}: OCI spec {}: {source}", .path.display())]
    Spec {
        id: String,
        path: PathBuf,
        source: SpecError,
    },
    #[error("exec {exec_id} in task {id}: its process spec is not an OCI process: {cause}")]
    ExecSpec {
        id: String,
        exec_id: String,
        cause: String,
    },
    #[error("task {id}: writing its record: {source}")]
    Record { id: String, source: io::Error },
    #[error("task {id}: rootfs: {cause}")]
    Rootfs { id: String, cause: String },
    #[error(transparent)]
    Volume(#[from] VolumeError),
    #[error("{what}: stdio: {source}")]
    Stdio { what: String, source: io::Error },
    #[error("task {id}: removing it failed: {cause}")]
    Removal { id: String, cause: String },
    #[error("task {id}: its metrics: {cause}")]
    Metrics { id: String, cause: String },

    // What peapod does not do.
    #[error("task {id}: peapod cannot restore a checkpoint")]
    Restore { id: String },
    #[error("task {id}: peapod does not checkpoint VM pods")]
    Checkpoint { id: String },
}

fn vmm_log_note(log: &Option<String>) -> String {
    log.as_ref()
        .map(|tail| format!(" (VMM log: {tail})"))
        .unwrap_or_default()
}

fn agent_cause(e: &ttrpc::Error) -> String {
    match e {
        ttrpc::Error::RpcStatus(s) => format!("the guest agent answered: {}", s.message()),
        other => format!("the guest agent: {other}"),
    }
}

/// An agent call's failure, named by `what` ("task c1: StartContainer").
pub fn agent(what: impl Into<String>) -> impl FnOnce(ttrpc::Error) -> ShimError {
    let what = what.into();
    move |source| ShimError::Agent { what, source }
}

/// " exec <id>" for an exec, nothing for a container's own process.
pub fn exec_label(exec_id: &str) -> String {
    if exec_id.is_empty() {
        String::new()
    } else {
        format!(" exec {exec_id}")
    }
}
