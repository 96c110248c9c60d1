//! The shim's process life: `start` (run by containerd once per container; starts
//! the pod's shim server or finds the running one), `delete` (cleans up a task from
//! its bundle alone) and the server itself.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::{Config, CONFIG_ENV};
use crate::sandbox_vm;
use crate::service::Service;
use crate::spec::{OciSpec, BUNDLE_SPEC};
use crate::state::{self, TaskRecord};
use async_trait::async_trait;
use containerd_shim::asynchronous::{ExitSignal, Shim};
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Config as ShimConfig, Error, Flags, StartOpts};
use containerd_shim_protos::api;
use containerd_shim_protos::protobuf::MessageField;

/// The runtime type containerd knows the shim by.
pub const RUNTIME_TYPE: &str = "io.containerd.peapod.v2";
/// The bundle's file naming the pod's shim socket, as containerd reads it.
const ADDRESS_FILE: &str = "address";

pub struct PeapodShim {
    namespace: String,
    bundle: String,
    debug: bool,
    exit: Arc<ExitSignal>,
}

/// The crate's own reaping and subreaper are off: the VMM is the shim's only child
/// and the pod supervises it itself.
pub fn shim_config() -> ShimConfig {
    ShimConfig {
        no_reaper: true,
        no_sub_reaper: true,
        ..Default::default()
    }
}

fn other(what: impl std::fmt::Display) -> Error {
    Error::Other(what.to_string())
}

/// The configuration of the server: the file the runtime options name (passed on as
/// `PEAPOD_CONFIG` by `start`), or the default.
fn load_config() -> Result<Config, Error> {
    Config::load(None).map_err(other)
}

#[async_trait]
impl Shim for PeapodShim {
    type T = Service;

    async fn new(_runtime_id: &str, args: &Flags, _config: &mut ShimConfig) -> Self {
        PeapodShim {
            namespace: args.namespace.clone(),
            bundle: args.bundle.clone(),
            debug: args.debug,
            exit: Arc::new(ExitSignal::default()),
        }
    }

    /// One shim per pod: containers carrying the same `io.kubernetes.cri.sandbox-id`
    /// share the socket of the first; a container without it is a pod of its own.
    async fn start_shim(&mut self, opts: StartOpts) -> Result<String, Error> {
        let spec = OciSpec::read(Path::new(".")).map_err(|e| {
            other(format!(
                "task {}: no readable {BUNDLE_SPEC} in the bundle: {e}",
                opts.id
            ))
        })?;
        let (grouping, _) = spec.pod_identity(&opts.id);
        let address = containerd_shim::socket_address(&opts.address, &opts.namespace, &grouping);
        let socket_path = address.trim_start_matches("unix://").to_string();
        if std::os::unix::net::UnixStream::connect(&socket_path).is_ok() {
            // The pod's shim runs already.
            std::fs::write(ADDRESS_FILE, &address).map_err(other)?;
            return Ok(address);
        }
        let mut stdin = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut stdin);
        let config_path = crate::options::from_stdin_bytes(&stdin)
            .and_then(|any| crate::options::config_path(&any));
        spawn_server(&opts, &address, config_path.as_deref()).await?;
        std::fs::write(ADDRESS_FILE, &address).map_err(other)?;
        Ok(address)
    }

    /// Cleans up after a task whose shim is gone (or never answered), from the
    /// bundle alone: its container's files and, for the pod's sandbox, the VMM, the
    /// network plumbing and the pod's directory. Idempotent.
    async fn delete_shim(&mut self) -> Result<api::DeleteResponse, Error> {
        let bundle = PathBuf::from(&self.bundle);
        let dir = if bundle.as_os_str().is_empty() {
            std::env::current_dir().map_err(other)?
        } else {
            bundle
        };
        tokio::task::spawn_blocking(move || cleanup_from_bundle(&dir))
            .await
            .map_err(other)?
            .map_err(other)?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Ok(api::DeleteResponse {
            pid: 0,
            exit_status: 128 + libc::SIGKILL as u32,
            exited_at: MessageField::some(
                containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp {
                    seconds: now.as_secs() as i64,
                    nanos: now.subsec_nanos() as i32,
                    ..Default::default()
                },
            ),
            ..Default::default()
        })
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        let config = match load_config() {
            Ok(c) => c,
            Err(e) => {
                // Nothing can run without a configuration; say why and leave.
                log::error!("{e}");
                eprintln!("{e}");
                std::process::exit(1);
            }
        };
        if let Ok(level) = config.log_level.parse::<log::LevelFilter>() {
            if !self.debug {
                log::set_max_level(level);
            }
        }
        Service::new(config, self.namespace.clone(), publisher, self.exit.clone())
    }
}

/// What `delete` does, as a function of the bundle directory.
pub fn cleanup_from_bundle(bundle: &Path) -> std::io::Result<()> {
    remove_dead_socket(bundle)?;
    let Some(rec) = state::read_json::<TaskRecord>(&bundle.join(state::BUNDLE_FILE))? else {
        return Ok(());
    };
    rec.files.remove()?;
    if rec.sandbox {
        sandbox_vm::cleanup_pod_dir(&rec.pod_dir)?;
    }
    state::remove_file(&bundle.join(state::BUNDLE_FILE))
}

/// Removes the pod's shim socket that the bundle's `address` names, once nothing
/// listens on it: a shim that was killed could not remove it, and containerd does not.
/// A socket a live shim answers on (the pod's other tasks) stays.
fn remove_dead_socket(bundle: &Path) -> std::io::Result<()> {
    let address = match std::fs::read_to_string(bundle.join(ADDRESS_FILE)) {
        Ok(a) => a,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let path = Path::new(address.trim().trim_start_matches("unix://"));
    match std::os::unix::net::UnixStream::connect(path) {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            log::info!("removing {}: its shim is gone", path.display());
            state::remove_file(path)
        }
        // Alive, or gone already.
        _ => Ok(()),
    }
}

/// Starts the shim server (this binary without `start`) in its own session, and
/// waits until it has its socket (it closes its stdout then).
async fn spawn_server(
    opts: &StartOpts,
    address: &str,
    config_path: Option<&Path>,
) -> Result<(), Error> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().map_err(other)?;
    let mut cmd = std::process::Command::new(exe);
    cmd.current_dir(std::env::current_dir().map_err(other)?)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .args(["-namespace", &opts.namespace, "-id", &opts.id])
        .args(["-address", &opts.address, "-socket", address]);
    if opts.debug {
        cmd.arg("-debug");
    }
    if let Some(p) = config_path {
        cmd.env(CONFIG_ENV, p);
    }
    // Its own session: a signal to containerd's process group does not reach it.
    cmd.process_group(0);
    let mut child = cmd
        .spawn()
        .map_err(|e| other(format!("starting the shim server: {e}")))?;
    let mut out = child.stdout.take().expect("piped");
    tokio::task::spawn_blocking(move || {
        let mut sink = Vec::new();
        let _ = out.read_to_end(&mut sink);
    })
    .await
    .map_err(other)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `delete` after a crash: the bundle's record leads to the container's files (its
    /// work dir under the pod's data directory, its upper disk in the snapshot) and
    /// the pod's directories, which go; a second run (containerd retries) finds
    /// nothing to do.
    #[test]
    fn delete_cleans_up_from_the_bundle_alone_and_twice() {
        let dir = tempfile::tempdir().unwrap();
        let bundle = dir.path().join("bundle");
        let pod_dir = dir.path().join("pods/ns-p1");
        let data_dir = dir.path().join("data/ns-p1");
        let work_dir = state::container_dir(&data_dir, "p1");
        let upperdir = dir.path().join("snapshots/4/fs");
        std::fs::create_dir_all(&bundle).unwrap();
        std::fs::create_dir_all(&work_dir).unwrap();
        std::fs::create_dir_all(&pod_dir).unwrap();
        std::fs::create_dir_all(&upperdir).unwrap();
        let upper = upperdir.join(crate::rootfs::UPPER_IN_SNAPSHOT);
        std::fs::write(&upper, b"x").unwrap();
        std::fs::write(work_dir.join("snapshot-upper.erofs"), b"x").unwrap();
        // A VMM record whose pid is not that process any more: left alone.
        let me = std::process::id();
        let rec = state::VmmRecord {
            pid: me,
            start_time: state::start_time(me).unwrap() + 1,
        };
        state::write_json(&pod_dir.join(state::VMM_RECORD), &rec).unwrap();
        let data = state::DataRecord {
            dir: data_dir.clone(),
        };
        state::write_json(&pod_dir.join(state::DATA_RECORD), &data).unwrap();
        let task = TaskRecord {
            pod_dir: pod_dir.clone(),
            files: state::ContainerFiles {
                work_dir: work_dir.clone(),
                upper: Some(upper.clone()),
            },
            sandbox: true,
        };
        state::write_json(&bundle.join(state::BUNDLE_FILE), &task).unwrap();
        // The dead shim's socket: bound, then its listener gone.
        let socket = dir.path().join("shim.sock");
        drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
        let address = format!("unix://{}", socket.display());
        std::fs::write(bundle.join(ADDRESS_FILE), &address).unwrap();

        cleanup_from_bundle(&bundle).unwrap();
        assert!(!socket.exists(), "the dead shim's socket is left");
        assert!(!pod_dir.exists(), "the pod's directory is left");
        assert!(!data_dir.exists(), "the pod's data directory is left");
        assert!(!upper.exists(), "the upper disk is left in the snapshot");
        assert!(upperdir.exists(), "the snapshot is containerd's");
        assert!(!bundle.join(state::BUNDLE_FILE).exists());
        assert!(bundle.exists(), "the bundle is containerd's to remove");
        cleanup_from_bundle(&bundle).unwrap();

        // A socket a live shim listens on stays.
        let live = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        cleanup_from_bundle(&bundle).unwrap();
        assert!(socket.exists(), "a live shim's socket was removed");
        drop(live);
    }
}
