//! A blocking client: one request per connection (`Connection: close`), the request
//! written by hand (a few header lines), the reply read to its end and parsed with
//! `httparse`, the parser the VMM reads requests with. A disk's open descriptor rides
//! on the request's first bytes as `SCM_RIGHTS`, which is why the client owns its
//! socket rather than sitting on an HTTP crate's connection pool.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::{
    BlockClear, BlockRegion, BlockRemove, BlockSet, Endpoint, ErrorBody, Method, SnapshotCreate,
    VmInfo,
};

/// How long one request may take, connection to last byte of the reply.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// How often [`VmmClient::wait_ready`] tries again.
const READY_POLL: Duration = Duration::from_millis(20);
/// The VMM answers with three headers; a few more are tolerated.
const MAX_REPLY_HEADERS: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "VMM API socket {}: cannot connect: {source} (is the VMM running, and is this its \
         --api-socket?)",
        socket.display()
    )]
    Connect { socket: PathBuf, source: io::Error },
    #[error(
        "VMM API {what} on {}: {source} (the VMM closed the connection or did not answer \
         in time; its log says why)",
        socket.display()
    )]
    Exchange {
        what: String,
        socket: PathBuf,
        source: io::Error,
    },
    #[error(
        "VMM API {what} on {}: not an HTTP reply: {reason} (is something other than \
         peapod-vmm listening on this socket?)",
        socket.display()
    )]
    NotHttp {
        what: String,
        socket: PathBuf,
        reason: String,
    },
    /// The VMM's message names the object, the cause and the fix.
    #[error("VMM API {what}: the VMM answered {status}: {message}")]
    Refused {
        what: String,
        status: u16,
        message: String,
    },
    #[error(
        "VMM API {what}: cannot write the request's JSON: {source} (a path that is not UTF-8?)"
    )]
    Request {
        what: String,
        source: serde_json::Error,
    },
    #[error(
        "VMM API {what}: the reply's JSON does not parse: {source} (are this client and the \
         VMM from the same build?)"
    )]
    Reply {
        what: String,
        source: serde_json::Error,
    },
    #[error(
        "VMM API socket {}: no answer in {waited:?}: {last} (did the VMM fail at start-up? \
         its log says)",
        socket.display()
    )]
    NotReady {
        socket: PathBuf,
        waited: Duration,
        last: Box<ClientError>,
    },
}

impl ClientError {
    /// The HTTP status the VMM refused the request with, if it did.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Refused { status, .. } => Some(*status),
            ClientError::NotReady { last, .. } => last.status(),
            _ => None,
        }
    }
}

/// A reply as it came, whatever its status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawReply {
    pub status: u16,
    pub body: String,
}

/// The control API of one VMM, by its socket's path.
#[derive(Debug, Clone)]
pub struct VmmClient {
    socket: PathBuf,
    timeout: Duration,
}

impl VmmClient {
    pub fn new(socket: impl Into<PathBuf>) -> VmmClient {
        VmmClient {
            socket: socket.into(),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// How long one request may take (default [`DEFAULT_TIMEOUT`]).
    pub fn with_timeout(self, timeout: Duration) -> VmmClient {
        VmmClient { timeout, ..self }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Asks `vm.info` until it is answered (the VMM binds its socket before the
    /// guest's first instruction and answers once its event loop runs), or `timeout`.
    pub fn wait_ready(&self, timeout: Duration) -> Result<VmInfo, ClientError> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.info() {
                Ok(info) => return Ok(info),
                Err(last) if Instant::now() >= deadline => {
                    return Err(ClientError::NotReady {
                        socket: self.socket.clone(),
                        waited: timeout,
                        last: Box::new(last),
                    })
                }
                Err(_) => std::thread::sleep(READY_POLL),
            }
        }
    }

    pub fn info(&self) -> Result<VmInfo, ClientError> {
        let body = self.call(Endpoint::VmInfo, None::<&()>, None)?;
        serde_json::from_str(&body).map_err(|source| ClientError::Reply {
            what: what(Endpoint::VmInfo),
            source,
        })
    }

    pub fn pause(&self) -> Result<(), ClientError> {
        self.call(Endpoint::VmPause, None::<&()>, None).map(drop)
    }

    pub fn resume(&self) -> Result<(), ClientError> {
        self.call(Endpoint::VmResume, None::<&()>, None).map(drop)
    }

    /// The VMM tears down and exits 0 after answering.
    pub fn shutdown(&self) -> Result<(), ClientError> {
        self.call(Endpoint::VmShutdown, None::<&()>, None).map(drop)
    }

    /// Writes the paused VM's state and memory into `dir`, which must exist.
    pub fn snapshot(&self, dir: &Path) -> Result<(), ClientError> {
        let create = SnapshotCreate {
            dir: dir.to_path_buf(),
        };
        self.call(Endpoint::VmSnapshot, Some(&create), None)
            .map(drop)
    }

    /// Puts the file at `set.path` in a slot; the VMM opens it.
    pub fn block_set(&self, set: &BlockSet) -> Result<(), ClientError> {
        self.call(Endpoint::BlockSet, Some(set), None).map(drop)
    }

    /// Puts `file` in a slot, passed open with the request (a jailed VMM cannot open
    /// host paths); `set.path` only names it in the VMM's log.
    pub fn block_set_open(&self, set: &BlockSet, file: &File) -> Result<(), ClientError> {
        let set = BlockSet {
            fd: true,
            ..set.clone()
        };
        self.call(Endpoint::BlockSet, Some(&set), Some(file.as_fd()))
            .map(drop)
    }

    /// Empties a slot; the guest sees a disk of size 0.
    pub fn block_clear(&self, slot: u32) -> Result<(), ClientError> {
        let clear = BlockClear { slot };
        self.call(Endpoint::BlockClear, Some(&clear), None)
            .map(drop)
    }

    /// Adds `file` to the store in slot `set.slot`, passed open with the request;
    /// where the guest finds it.
    pub fn block_append_open(
        &self,
        set: &BlockSet,
        file: &File,
    ) -> Result<BlockRegion, ClientError> {
        let set = BlockSet {
            fd: true,
            ..set.clone()
        };
        let body = self.call(Endpoint::BlockAppend, Some(&set), Some(file.as_fd()))?;
        serde_json::from_str(&body).map_err(|source| ClientError::Reply {
            what: what(Endpoint::BlockAppend),
            source,
        })
    }

    /// Drops the file at `start_sector` from the store in `slot`.
    pub fn block_remove(&self, slot: u32, start_sector: u64) -> Result<(), ClientError> {
        let remove = BlockRemove { slot, start_sector };
        self.call(Endpoint::BlockRemove, Some(&remove), None)
            .map(drop)
    }

    /// One request to `endpoint`; the body of its success, or why not.
    fn call<B: Serialize>(
        &self,
        endpoint: Endpoint,
        body: Option<&B>,
        file: Option<BorrowedFd<'_>>,
    ) -> Result<String, ClientError> {
        let body = match body {
            Some(b) => serde_json::to_vec(b).map_err(|source| ClientError::Request {
                what: what(endpoint),
                source,
            })?,
            None => Vec::new(),
        };
        let reply = self.send(endpoint.method(), endpoint.path(), &body, file)?;
        if reply.status == endpoint.success_status() {
            return Ok(reply.body);
        }
        let message = match serde_json::from_str::<ErrorBody>(&reply.body) {
            Ok(e) => e.error,
            Err(_) => reply.body.trim().to_string(),
        };
        Err(ClientError::Refused {
            what: what(endpoint),
            status: reply.status,
            message,
        })
    }

    /// One request as given, and its reply whatever the status: for what the typed
    /// calls cannot say (a test of how the VMM refuses a wrong path or method).
    pub fn send(
        &self,
        method: Method,
        path: &str,
        body: &[u8],
        file: Option<BorrowedFd<'_>>,
    ) -> Result<RawReply, ClientError> {
        let what = format!("{} {path}", method.as_str());
        let mut stream =
            UnixStream::connect(&self.socket).map_err(|source| ClientError::Connect {
                socket: self.socket.clone(),
                source,
            })?;
        let exchange_err = |source| ClientError::Exchange {
            what: what.clone(),
            socket: self.socket.clone(),
            source,
        };
        let reply = exchange(
            &mut stream,
            self.timeout,
            &request(method, path, body),
            file,
        )
        .map_err(exchange_err)?;
        parse_reply(&reply).map_err(|reason| ClientError::NotHttp {
            what: what.clone(),
            socket: self.socket.clone(),
            reason,
        })
    }
}

/// `GET vm.info`: how errors name a call.
fn what(endpoint: Endpoint) -> String {
    format!("{} {}", endpoint.method().as_str(), endpoint.name())
}

/// The bytes of one request.
fn request(method: Method, path: &str, body: &[u8]) -> Vec<u8> {
    let mut head = format!(
        "{} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n",
        method.as_str()
    );
    if !body.is_empty() {
        head.push_str("Content-Type: application/json\r\n");
    }
    let _ = write!(head, "Content-Length: {}\r\n\r\n", body.len());
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// Writes the request, `file` on its first bytes, and reads the reply to its end
/// (the VMM closes a `Connection: close` connection after answering).
fn exchange(
    stream: &mut UnixStream,
    timeout: Duration,
    request: &[u8],
    file: Option<BorrowedFd<'_>>,
) -> io::Result<Vec<u8>> {
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let sent = match file {
        Some(fd) => stream
            .send_with_fd(request, fd.as_raw_fd())
            .map_err(io::Error::from)?,
        None => 0,
    };
    stream.write_all(&request[sent..])?;
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply)?;
    Ok(reply)
}

/// A whole reply's status and body, or what is wrong with it.
fn parse_reply(reply: &[u8]) -> Result<RawReply, String> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_REPLY_HEADERS];
    let mut parsed = httparse::Response::new(&mut headers);
    let head_len = match parsed.parse(reply) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            return Err(format!(
                "it ends inside its head after {} bytes: {:?}",
                reply.len(),
                String::from_utf8_lossy(reply)
            ))
        }
        Err(e) => return Err(format!("{e}: {:?}", String::from_utf8_lossy(reply))),
    };
    let status = parsed.code.ok_or("it has no status code")?;
    let rest = &reply[head_len..];
    let length = parsed
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .map(|h| {
            std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .ok_or_else(|| format!("bad Content-Length {:?}", String::from_utf8_lossy(h.value)))
        })
        .transpose()?;
    let body = match length {
        Some(n) => rest.get(..n).ok_or_else(|| {
            format!(
                "its body is {} bytes, its Content-Length says {n}",
                rest.len()
            )
        })?,
        None => rest,
    };
    Ok(RawReply {
        status,
        body: String::from_utf8_lossy(body).into_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::net::UnixListener;

    /// A socket path of its own for each test.
    fn socket_path() -> (vmm_sys_util::tempdir::TempDir, PathBuf) {
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/peapod-vmm-api-").unwrap();
        let path = dir.as_path().join("api.sock");
        (dir, path)
    }

    /// A server that answers one connection with `reply`; gives back the request's
    /// bytes and the descriptor that came with them.
    fn serve_once(
        path: &Path,
        reply: &'static str,
    ) -> std::thread::JoinHandle<(String, Option<File>)> {
        let listener = UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut request = Vec::new();
            let mut passed = None;
            let mut chunk = [0u8; 4096];
            // The request is whole once its Content-Length of body has come.
            loop {
                let (n, file) = stream.recv_with_fd(&mut chunk).unwrap();
                passed = passed.or(file);
                request.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&request);
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("Content-Length: "))
                        .map_or(0, |v| v.parse().unwrap());
                    if body.len() >= len {
                        break;
                    }
                }
                assert!(n > 0, "the client closed mid-request");
            }
            stream.write_all(reply.as_bytes()).unwrap();
            (String::from_utf8(request).unwrap(), passed)
        })
    }

    #[test]
    fn block_set_open_sends_the_file_with_the_request() {
        let (_dir, path) = socket_path();
        let server = serve_once(
            &path,
            "HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n",
        );
        let image = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
        let set = BlockSet {
            slot: 2,
            path: "/layers/a.erofs".into(),
            read_only: true,
            id: Some("a".into()),
            fd: false,
        };
        VmmClient::new(&path).block_set_open(&set, &image).unwrap();
        let (request, passed) = server.join().unwrap();
        assert!(
            request.starts_with("PUT /api/v1/block.set HTTP/1.1\r\n"),
            "{request}"
        );
        assert!(request.contains("Connection: close\r\n"), "{request}");
        let body = request.split_once("\r\n\r\n").unwrap().1;
        let sent: BlockSet = serde_json::from_str(body).unwrap();
        assert_eq!(sent, BlockSet { fd: true, ..set });
        let passed = passed.expect("the descriptor came with the request");
        assert_eq!(
            passed.metadata().unwrap().ino(),
            image.metadata().unwrap().ino()
        );
    }

    #[test]
    fn a_refusal_carries_the_vmms_status_and_message() {
        let (_dir, path) = socket_path();
        let server = serve_once(
            &path,
            "HTTP/1.1 409 Conflict\r\nContent-Type: application/json\r\nContent-Length: 37\r\n\r\n{\"error\":\"the VM is already paused\"}\n",
        );
        let e = VmmClient::new(&path).pause().unwrap_err();
        let (request, passed) = server.join().unwrap();
        assert!(request.starts_with("PUT /api/v1/vm.pause "), "{request}");
        assert!(request.ends_with("Content-Length: 0\r\n\r\n"), "{request}");
        assert!(passed.is_none());
        assert_eq!(e.status(), Some(409));
        assert_eq!(
            e.to_string(),
            "VMM API PUT vm.pause: the VMM answered 409: the VM is already paused"
        );
    }

    #[test]
    fn vm_info_is_read_into_its_type() {
        let (_dir, path) = socket_path();
        let server = serve_once(
            &path,
            "HTTP/1.1 200 OK\r\nContent-Length: 82\r\n\r\n\
             {\"state\":\"running\",\"vcpus\":1,\"memory_mib\":128,\"platform_quirks\":true,\"devices\":[]}",
        );
        let info = VmmClient::new(&path).info().unwrap();
        assert_eq!(info.state, crate::VmState::Running);
        assert_eq!((info.vcpus, info.memory_mib), (1, 128));
        assert!(server.join().unwrap().0.starts_with("GET /api/v1/vm.info "));
    }

    #[test]
    fn what_is_not_http_or_not_there_is_named() {
        let (_dir, path) = socket_path();
        let server = serve_once(&path, "SSH-2.0-OpenSSH\r\n");
        let e = VmmClient::new(&path).resume().unwrap_err();
        server.join().unwrap();
        assert!(matches!(e, ClientError::NotHttp { .. }), "{e}");
        assert!(e.to_string().contains("not an HTTP reply"), "{e}");

        let (_dir, path) = socket_path();
        let server = serve_once(&path, "HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n{}");
        let e = VmmClient::new(&path).info().unwrap_err();
        server.join().unwrap();
        assert!(e.to_string().contains("Content-Length says 99"), "{e}");

        let (_dir, path) = socket_path();
        let e = VmmClient::new(&path)
            .wait_ready(Duration::from_millis(50))
            .unwrap_err();
        assert!(matches!(e, ClientError::NotReady { .. }), "{e}");
        assert!(
            e.to_string().contains("cannot connect") && e.to_string().contains("--api-socket"),
            "{e}"
        );
    }

    #[test]
    fn replies_are_parsed_by_their_length() {
        let r = parse_reply(b"HTTP/1.1 404 Not Found\r\ncontent-length: 2\r\n\r\n{}extra").unwrap();
        assert_eq!(
            r,
            RawReply {
                status: 404,
                body: "{}".into()
            }
        );
        let r = parse_reply(b"HTTP/1.1 204 No Content\r\n\r\n").unwrap();
        assert_eq!((r.status, r.body.as_str()), (204, ""));
        assert!(parse_reply(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n").is_err());
        assert!(parse_reply(b"HTTP/1.1 200 OK\r\n").is_err());
    }
}
