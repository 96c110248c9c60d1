//! A state file: one header line, then the state as JSON.
//!
//! ```text
//! {"format":"peapod-vm-state","version":1,"length":12345,"crc32":305419896}
//! {...the state, `length` bytes, whose CRC-32 is `crc32`...}
//! ```
//!
//! The header is read before the state is parsed, so a file of another format or
//! version, a truncated one and a corrupted one are each refused with their cause.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// What the first line names.
const FORMAT: &str = "peapod-vm-state";

/// The layout of the state this build writes and reads. Raise it whenever a saved
/// type changes.
pub const VERSION: u32 = 1;

/// How long a header line may be.
const MAX_HEADER: u64 = 256;

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    format: String,
    version: u32,
    length: u64,
    crc32: u32,
}

/// What the fix is for every refused file: the state is a cache of a boot.
const FIX: &str = "boot the VM instead, and make the snapshot again";

#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    #[error("state file {path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("state file {path}: not a {FORMAT} file (its first line: {first_line:?}); {FIX}")]
    NotAStateFile { path: PathBuf, first_line: String },
    #[error(
        "state file {path}: layout version {found}, but this peapod-vmm reads version \
         {VERSION} only (it was made by another build); {FIX}"
    )]
    Version { path: PathBuf, found: u32 },
    #[error(
        "state file {path}: {found} bytes of state where the header says {expected} \
         (the file is truncated or was appended to); {FIX}"
    )]
    Length {
        path: PathBuf,
        expected: u64,
        found: u64,
    },
    #[error(
        "state file {path}: checksum {found:#010x} where the header says {expected:#010x} \
         (the file is corrupted); {FIX}"
    )]
    Checksum {
        path: PathBuf,
        expected: u32,
        found: u32,
    },
    #[error("state file {path}: the state does not parse: {source}; {FIX}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// Writes `state` to a new file at `path` (replacing one there), synced.
pub fn write<T: Serialize>(path: &Path, state: &T) -> Result<(), StateFileError> {
    let io = |what| {
        move |source| StateFileError::Io {
            path: path.to_path_buf(),
            what,
            source,
        }
    };
    let body = serde_json::to_vec(state).map_err(|e| io("serialising")(e.into()))?;
    let header = Header {
        format: FORMAT.into(),
        version: VERSION,
        length: body.len() as u64,
        crc32: crc32fast::hash(&body),
    };
    let mut text = serde_json::to_vec(&header).map_err(|e| io("serialising")(e.into()))?;
    text.push(b'\n');
    text.extend_from_slice(&body);
    let mut file = std::fs::File::create(path).map_err(io("creating it"))?;
    file.write_all(&text).map_err(io("writing it"))?;
    file.sync_data().map_err(io("syncing it"))
}

/// Reads the state in the file at `path`, refusing a file that is not one this
/// build wrote whole.
pub fn read<T: DeserializeOwned>(path: &Path) -> Result<T, StateFileError> {
    let p = || path.to_path_buf();
    let io = |what| {
        move |source| StateFileError::Io {
            path: path.to_path_buf(),
            what,
            source,
        }
    };
    let mut file = BufReader::new(std::fs::File::open(path).map_err(io("opening it"))?);
    let mut line = Vec::new();
    (&mut file)
        .take(MAX_HEADER)
        .read_until(b'\n', &mut line)
        .map_err(io("reading its header"))?;
    let not_ours = || StateFileError::NotAStateFile {
        path: p(),
        first_line: String::from_utf8_lossy(&line)
            .trim_end()
            .chars()
            .take(80)
            .collect(),
    };
    let header: Header = serde_json::from_slice(&line).map_err(|_| not_ours())?;
    if header.format != FORMAT {
        return Err(not_ours());
    }
    if header.version != VERSION {
        return Err(StateFileError::Version {
            path: p(),
            found: header.version,
        });
    }
    let mut body = Vec::new();
    file.take(header.length.saturating_add(1))
        .read_to_end(&mut body)
        .map_err(io("reading its state"))?;
    if body.len() as u64 != header.length {
        return Err(StateFileError::Length {
            path: p(),
            expected: header.length,
            found: body.len() as u64,
        });
    }
    let found = crc32fast::hash(&body);
    if found != header.crc32 {
        return Err(StateFileError::Checksum {
            path: p(),
            expected: header.crc32,
            found,
        });
    }
    serde_json::from_slice(&body).map_err(|source| StateFileError::Parse { path: p(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct S {
        a: u64,
        b: Vec<u8>,
    }

    fn state() -> S {
        S {
            a: 7,
            b: vec![1, 2, 3],
        }
    }

    #[test]
    fn a_state_round_trips_and_each_damage_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.state");
        write(&path, &state()).unwrap();
        assert_eq!(read::<S>(&path).unwrap(), state());
        let good = std::fs::read(&path).unwrap();
        let newline = good.iter().position(|&b| b == b'\n').unwrap();

        let err = |bytes: &[u8]| {
            std::fs::write(&path, bytes).unwrap();
            let e = read::<S>(&path).unwrap_err();
            let text = e.to_string();
            assert!(text.contains("vm.state"), "names the file: {text}");
            assert!(text.contains("boot the VM instead"), "says the fix: {text}");
            e
        };

        let e = err(b"#!/bin/sh\necho hi\n");
        assert!(matches!(e, StateFileError::NotAStateFile { .. }), "{e}");

        let text = String::from_utf8(good.clone()).unwrap();
        let e = err(text
            .replacen("\"version\":1", "\"version\":99", 1)
            .as_bytes());
        assert!(
            matches!(e, StateFileError::Version { found: 99, .. }),
            "{e}"
        );

        let e = err(&good[..good.len() - 2]);
        assert!(matches!(e, StateFileError::Length { .. }), "{e}");
        let mut longer = good.clone();
        longer.push(b' ');
        let e = err(&longer);
        assert!(matches!(e, StateFileError::Length { .. }), "{e}");

        let mut flipped = good.clone();
        flipped[newline + 6] ^= 0x01;
        let e = err(&flipped);
        assert!(matches!(e, StateFileError::Checksum { .. }), "{e}");

        let e = read::<S>(&dir.path().join("none")).unwrap_err();
        assert!(matches!(e, StateFileError::Io { .. }), "{e}");
    }
}
