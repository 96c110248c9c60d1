//! A container's OCI spec as the shim reads it. Every read goes through `oci-spec`'s
//! types (the version the agent validates with, so a spec the shim accepts is one the
//! agent can parse). What goes on to the agent is the JSON containerd wrote, with only
//! the shim's own edits: re-serialising the typed spec would drop any field `oci-spec`
//! does not know (a newer runtime-spec field, a vendor's), and the guest would run a
//! container without it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use oci_spec::runtime::{LinuxNamespaceType, Mount, Spec};
use serde::Deserialize;
use serde_json::Value;

/// The spec's file in a bundle.
pub const BUNDLE_SPEC: &str = "config.json";

/// The annotations CRI puts on every container's spec.
const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
const SANDBOX_NAME: &str = "io.kubernetes.cri.sandbox-name";
const SANDBOX_NAMESPACE: &str = "io.kubernetes.cri.sandbox-namespace";
const CONTAINER_NAME: &str = "io.kubernetes.cri.container-name";

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("{0} (containerd writes it into the bundle: is the bundle complete?)")]
    Read(std::io::Error),
    #[error("not JSON: {0}")]
    NotJson(serde_json::Error),
    #[error("not an OCI runtime spec: {0}")]
    NotOci(serde_json::Error),
}

/// One container's spec: typed for reading, and the JSON it came as for the agent.
#[derive(Debug, Clone)]
pub struct OciSpec {
    typed: Spec,
    json: Value,
}

/// Which network namespace a spec puts the pod in.
#[derive(Debug, Clone, PartialEq)]
pub enum NetworkNamespace {
    /// None named: the host's, which a VM cannot share.
    Host,
    /// A new empty one (`ctr run`): the guest has loopback only.
    New,
    /// The one CNI made, by its path.
    Path(PathBuf),
}

impl OciSpec {
    /// Parses a spec; the error is the cause, for the caller to name the file.
    pub fn parse(bytes: &[u8]) -> Result<OciSpec, SpecError> {
        OciSpec::from_json(serde_json::from_slice(bytes).map_err(SpecError::NotJson)?)
    }

    pub fn from_json(json: Value) -> Result<OciSpec, SpecError> {
        let typed = Spec::deserialize(&json).map_err(SpecError::NotOci)?;
        Ok(OciSpec { typed, json })
    }

    /// The bundle's spec.
    pub fn read(bundle: &Path) -> Result<OciSpec, SpecError> {
        OciSpec::parse(&std::fs::read(bundle.join(BUNDLE_SPEC)).map_err(SpecError::Read)?)
    }

    /// The JSON the agent gets: containerd's, with the shim's edits.
    pub fn to_guest_json(&self) -> Vec<u8> {
        serde_json::to_vec(&self.json).unwrap_or_default()
    }

    pub fn annotations(&self) -> HashMap<String, String> {
        self.typed.annotations().clone().unwrap_or_default()
    }

    fn annotation(&self, key: &str) -> Option<&str> {
        self.typed
            .annotations()
            .as_ref()?
            .get(key)
            .map(String::as_str)
    }

    /// The pod a container belongs to, and whether it is that pod's sandbox: CRI's
    /// annotations, or (for a container without them, e.g. `ctr run`) a pod of its own.
    pub fn pod_identity(&self, id: &str) -> (String, bool) {
        let sandbox_id = self.annotation(SANDBOX_ID).filter(|s| !s.is_empty());
        match (sandbox_id, self.annotation(CONTAINER_TYPE)) {
            (Some(sb), Some("sandbox")) => (sb.to_string(), true),
            (Some(sb), _) if sb == id => (sb.to_string(), true),
            (Some(sb), _) => (sb.to_string(), false),
            (None, _) => (id.to_string(), true),
        }
    }

    /// The pod as a user knows it, `namespace/name` from CRI's annotations, with the
    /// sandbox id's first 12 characters; the id alone without them.
    pub fn pod_display_name(&self, sandbox_id: &str) -> String {
        let short = &sandbox_id[..sandbox_id.len().min(12)];
        match (
            self.annotation(SANDBOX_NAMESPACE),
            self.annotation(SANDBOX_NAME),
        ) {
            (Some(ns), Some(name)) => format!("{ns}/{name} (sandbox {short})"),
            (None, Some(name)) => format!("{name} (sandbox {short})"),
            _ => sandbox_id.to_string(),
        }
    }

    /// The container's name in its pod (CRI's annotation), else its id.
    pub fn container_display_name(&self, id: &str) -> String {
        self.annotation(CONTAINER_NAME).unwrap_or(id).to_string()
    }

    /// `linux.resources.memory.limit`, if the spec sets a positive one.
    pub fn memory_limit(&self) -> Option<u64> {
        let limit = self
            .typed
            .linux()
            .as_ref()?
            .resources()
            .as_ref()?
            .memory()
            .as_ref()?
            .limit()?;
        u64::try_from(limit).ok().filter(|&l| l > 0)
    }

    pub fn network_namespace(&self) -> NetworkNamespace {
        let namespaces = self
            .typed
            .linux()
            .as_ref()
            .and_then(|l| l.namespaces().as_ref());
        let net = namespaces
            .into_iter()
            .flatten()
            .find(|n| n.typ() == LinuxNamespaceType::Network);
        match net {
            None => NetworkNamespace::Host,
            Some(n) => match n.path().as_ref().filter(|p| !p.as_os_str().is_empty()) {
                Some(p) => NetworkNamespace::Path(p.clone()),
                None => NetworkNamespace::New,
            },
        }
    }

    /// `linux.cgroupsPath`, if it names one.
    pub fn cgroups_path(&self) -> Option<String> {
        self.typed
            .linux()
            .as_ref()?
            .cgroups_path()
            .as_ref()
            .map(|p| p.to_string_lossy().into_owned())
            .filter(|p| !p.is_empty())
    }

    pub fn hostname(&self) -> &str {
        self.typed.hostname().as_deref().unwrap_or("")
    }

    pub fn sysctls(&self) -> HashMap<String, String> {
        self.typed
            .linux()
            .as_ref()
            .and_then(|l| l.sysctl().clone())
            .unwrap_or_default()
    }

    pub fn mounts(&self) -> &[Mount] {
        self.typed.mounts().as_deref().unwrap_or_default()
    }

    /// Points the `index`th mount at `source`, in the JSON the agent gets and in the
    /// typed spec alike.
    pub fn set_mount_source(&mut self, index: usize, source: &str) {
        if let Some(m) = self
            .typed
            .mounts_mut()
            .as_mut()
            .and_then(|m| m.get_mut(index))
        {
            m.set_source(Some(PathBuf::from(source)));
        }
        if let Some(m) = self
            .json
            .get_mut("mounts")
            .and_then(|m| m.get_mut(index))
            .and_then(Value::as_object_mut)
        {
            m.insert("source".into(), Value::String(source.into()));
        }
    }

    #[cfg(test)]
    pub fn json(&self) -> &Value {
        &self.json
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(v: Value) -> OciSpec {
        OciSpec::from_json(v).unwrap()
    }

    #[test]
    fn cri_annotations_group_containers_into_pods() {
        let sb = spec(json!({"annotations": {SANDBOX_ID: "sb1", CONTAINER_TYPE: "sandbox"}}));
        assert_eq!(sb.pod_identity("sb1"), ("sb1".into(), true));
        let c = spec(json!({"annotations": {SANDBOX_ID: "sb1", CONTAINER_TYPE: "container"}}));
        assert_eq!(c.pod_identity("c1"), ("sb1".into(), false));
        assert_eq!(spec(json!({})).pod_identity("solo"), ("solo".into(), true));
    }

    #[test]
    fn the_network_namespace_is_the_hosts_a_new_one_or_cnis() {
        let host = spec(json!({"linux": {"namespaces": [{"type": "pid"}]}}));
        assert_eq!(host.network_namespace(), NetworkNamespace::Host);
        let fresh = spec(json!({"linux": {"namespaces": [{"type": "network"}]}}));
        assert_eq!(fresh.network_namespace(), NetworkNamespace::New);
        let cni = spec(
            json!({"linux": {"namespaces": [{"type": "network", "path": "/var/run/netns/cni-1"}]}}),
        );
        assert_eq!(
            cni.network_namespace(),
            NetworkNamespace::Path("/var/run/netns/cni-1".into())
        );
    }

    /// Why the agent gets containerd's JSON with the shim's edits rather than the
    /// typed spec re-serialised: fields `oci-spec` does not know survive.
    #[test]
    fn an_edited_spec_keeps_the_fields_oci_spec_does_not_know() {
        let mut s = spec(json!({
            "ociVersion": "1.2.0",
            "mounts": [{"destination": "/etc/hosts", "type": "bind", "source": "/h"}],
            "linux": {"cgroupsPath": "/kubepods/p1/c1", "aFutureField": {"x": 1}},
            "org.example.vendor": [1, 2],
        }));
        assert_eq!(s.cgroups_path().as_deref(), Some("/kubepods/p1/c1"));
        s.set_mount_source(0, "/run/peapod/shared/x-hosts");
        assert_eq!(
            s.mounts()[0].source().as_deref(),
            Some(Path::new("/run/peapod/shared/x-hosts"))
        );
        let sent: Value = serde_json::from_slice(&s.to_guest_json()).unwrap();
        assert_eq!(sent["mounts"][0]["source"], "/run/peapod/shared/x-hosts");
        assert_eq!(sent["linux"]["aFutureField"]["x"], 1);
        assert_eq!(sent["org.example.vendor"], json!([1, 2]));
        let retyped = serde_json::to_value(&s.typed).unwrap();
        assert!(
            retyped["linux"].get("aFutureField").is_none(),
            "oci-spec learnt the field; the test needs another unknown one"
        );
    }

    #[test]
    fn a_spec_of_the_wrong_shape_is_refused_with_its_cause() {
        let e = OciSpec::parse(br#"{"mounts": [{"source": "/x"}]}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not an OCI") && e.contains("destination"), "{e}");
        assert!(OciSpec::parse(b"not json").is_err());
    }
}
