//! The runtime options containerd passes a shim (`Any`, on `start`'s stdin and in
//! `CreateTaskRequest.options`). The CRI plugin sends its generic
//! `runtimeoptions.v1.Options` for runtimes that are not runc: field 1 `type_url`,
//! field 2 `config_path`, set by `[...runtimes.peapod.options] ConfigPath = "..."`.

use std::path::PathBuf;

use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::{CodedInputStream, Message};

/// The configuration file the options name, if any. Options of another type, or
/// none, name none.
pub fn config_path(options: &Any) -> Option<PathBuf> {
    if !options.type_url.ends_with("runtimeoptions.v1.Options") {
        return None;
    }
    let mut input = CodedInputStream::from_bytes(&options.value);
    while let Ok(Some(tag)) = input.read_raw_tag_or_eof() {
        let (field, wire) = (tag >> 3, tag & 7);
        match (field, wire) {
            (2, 2) => {
                let path = input.read_string().ok()?;
                return (!path.is_empty()).then(|| PathBuf::from(path));
            }
            (_, 2) => {
                input.read_bytes().ok()?;
            }
            (_, 0) => {
                input.read_uint64().ok()?;
            }
            _ => return None,
        }
    }
    None
}

/// Parses the `Any` containerd wrote on stdin (empty: no options).
pub fn from_stdin_bytes(data: &[u8]) -> Option<Any> {
    if data.is_empty() {
        return None;
    }
    Any::parse_from_bytes(data).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_shim_protos::protobuf::CodedOutputStream;

    fn runtime_options(type_url: &str, path: &str) -> Any {
        let mut value = Vec::new();
        {
            let mut out = CodedOutputStream::vec(&mut value);
            out.write_string(1, "io.containerd.peapod.v2.Options")
                .unwrap();
            out.write_string(2, path).unwrap();
            out.flush().unwrap();
        }
        Any {
            type_url: type_url.into(),
            value,
            ..Default::default()
        }
    }

    #[test]
    fn the_cri_options_name_the_config_file() {
        let any = runtime_options(
            "type.googleapis.com/runtimeoptions.v1.Options",
            "/etc/peapod/other.toml",
        );
        assert_eq!(
            config_path(&any),
            Some(PathBuf::from("/etc/peapod/other.toml"))
        );
        let bytes = any.write_to_bytes().unwrap();
        assert_eq!(
            from_stdin_bytes(&bytes).and_then(|a| config_path(&a)),
            Some(PathBuf::from("/etc/peapod/other.toml"))
        );
    }

    #[test]
    fn other_options_name_nothing() {
        let any = runtime_options("containerd.runc.v1.Options", "/x");
        assert_eq!(config_path(&any), None);
        assert_eq!(from_stdin_bytes(&[]), None);
    }
}
