//! The control API's server: JSON over HTTP/1.1 on a unix socket, so `curl
//! --unix-socket` works. The endpoints and their bodies are `peapod-vmm-api`'s, shared
//! with the shim and the tests; docs/vmm.md has the table.
//!
//! `block.set` with `"fd": true` takes the file already open, sent with the request as
//! an `SCM_RIGHTS` descriptor (how the shim gives a jailed VMM its disks): `path` then
//! only names it. A descriptor goes to the next request on the connection that asks
//! for one.
//! The API thread only parses and answers; the event loop owns the VM and acts. HTTP
//! statuses are chosen here and nowhere else in the VMM.

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use peapod_devices::virtio::block::PassedFile;
use peapod_vmm_api::{paths, Endpoint, ErrorBody};
pub use peapod_vmm_api::{
    BlockClear, BlockRegion, BlockRemove, BlockSet, SnapshotCreate, VmInfo, VmState,
};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::devices::SlotError;
use crate::seccomp::{Seccomp, ThreadClass};

/// Requests are small; anything bigger is a client bug or an attack.
const MAX_REQUEST_BYTES: usize = 64 * 1024;
const MAX_HEADERS: usize = 32;
/// How long a connection may sit idle mid-request.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiRequest {
    Info,
    Pause,
    Resume,
    Shutdown,
    Snapshot(SnapshotCreate),
    /// `file`: the open file `set.fd` asked for, once the API thread has matched the
    /// descriptor that came with the request to it.
    BlockSet {
        set: BlockSet,
        file: Option<PassedFile>,
    },
    BlockClear(BlockClear),
    /// As `BlockSet`, for `block.append`.
    BlockAppend {
        set: BlockSet,
        file: Option<PassedFile>,
    },
    BlockRemove(BlockRemove),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiResponse {
    Info(VmInfo),
    Region(BlockRegion),
    Done,
    Error { status: u16, message: String },
}

impl ApiResponse {
    /// The request does not fit the VM's state (pausing a paused VM).
    pub fn conflict(message: impl Into<String>) -> ApiResponse {
        ApiResponse::Error {
            status: 409,
            message: message.into(),
        }
    }

    /// The VMM could not do what it was asked.
    pub fn failed(message: impl Into<String>) -> ApiResponse {
        ApiResponse::Error {
            status: 500,
            message: message.into(),
        }
    }
}

impl From<Result<(), SlotError>> for ApiResponse {
    fn from(r: Result<(), SlotError>) -> Self {
        match r {
            Ok(()) => ApiResponse::Done,
            Err(e) => ApiResponse::Error {
                status: match e {
                    SlotError::NoSuchSlot { .. } => 404,
                    SlotError::Backing { .. } => 400,
                },
                message: e.to_string(),
            },
        }
    }
}

/// A request on its way to the event loop, with the channel for its answer.
pub struct ApiCall {
    pub request: ApiRequest,
    pub reply: mpsc::SyncSender<ApiResponse>,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("api socket {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "api socket {0}: another process is listening on it (is another VMM using this path?)"
    )]
    InUse(PathBuf),
}

/// The bound socket file; removed when dropped, on every way out of the VMM.
pub struct ApiSocket {
    path: PathBuf,
    listener: Option<UnixListener>,
}

impl ApiSocket {
    pub fn bind(path: &Path) -> Result<Self, ApiError> {
        let bind_err = |source| ApiError::Bind {
            path: path.into(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(bind_err)?;
        }
        if path.exists() {
            // A socket left by a VMM that was killed is stale; a live one is not ours.
            if UnixStream::connect(path).is_ok() {
                return Err(ApiError::InUse(path.into()));
            }
            std::fs::remove_file(path).map_err(bind_err)?;
        }
        let listener = UnixListener::bind(path).map_err(bind_err)?;
        Ok(Self {
            path: path.into(),
            listener: Some(listener),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Starts the API thread, under its seccomp filter. Requests go to `calls`; `wake`
    /// tells the event loop.
    pub fn serve(
        &mut self,
        calls: mpsc::Sender<ApiCall>,
        wake: EventFd,
        seccomp: Seccomp,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        let listener = self.listener.take().expect("serve is called once");
        seccomp.spawn("api".into(), ThreadClass::Api, move || {
            for stream in listener.incoming().flatten() {
                if let Err(e) = serve_connection(stream, &calls, &wake) {
                    log::debug!("api connection: {e}");
                }
            }
        })
    }
}

impl Drop for ApiSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

struct HttpRequest {
    method: String,
    path: String,
    body: Vec<u8>,
    keep_alive: bool,
}

#[derive(Debug, PartialEq, Eq)]
struct HttpError(u16, String);

/// Parses one request from the front of `buf`: `Ok(None)` if more bytes are needed,
/// else the request and how many bytes it used.
fn parse_request(buf: &[u8]) -> Result<Option<(HttpRequest, usize)>, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(HttpError(400, format!("malformed HTTP request: {e}"))),
    };
    let header = |name: &str| {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).trim().to_ascii_lowercase())
    };
    let body_len = match header("content-length") {
        Some(v) => v
            .parse::<usize>()
            .map_err(|_| HttpError(400, format!("bad Content-Length {v:?}")))?,
        None => 0,
    };
    if head_len + body_len > MAX_REQUEST_BYTES {
        return Err(HttpError(413, "request larger than 64 KiB".into()));
    }
    if buf.len() < head_len + body_len {
        return Ok(None);
    }
    let keep_alive = header("connection").as_deref() != Some("close") && req.version == Some(1);
    Ok(Some((
        HttpRequest {
            method: req.method.unwrap_or_default().to_string(),
            path: req.path.unwrap_or_default().to_string(),
            body: buf[head_len..head_len + body_len].to_vec(),
            keep_alive,
        },
        head_len + body_len,
    )))
}

/// What a connection's bytes ask for, request by request, parsed and routed as the API
/// thread does it (without the socket and the event loop): each request, or the HTTP
/// status of the error it is answered with. Stops where the connection would close or
/// wait for more bytes. The fuzz target `api_requests` drives it.
pub fn requests_in(mut buf: &[u8]) -> Vec<Result<ApiRequest, u16>> {
    let mut out = Vec::new();
    loop {
        match parse_request(buf) {
            Err(HttpError(status, _)) => {
                out.push(Err(status));
                return out;
            }
            Ok(None) => return out,
            Ok(Some((req, used))) => {
                out.push(route(&req.method, &req.path, &req.body).map_err(|e| e.0));
                buf = &buf[used..];
                if !req.keep_alive {
                    return out;
                }
            }
        }
    }
}

fn route(method: &str, path: &str, body: &[u8]) -> Result<ApiRequest, HttpError> {
    let action = path.strip_prefix(paths::PREFIX).ok_or_else(|| {
        HttpError(
            404,
            format!("{path}: not found; the API lives under {}", paths::PREFIX),
        )
    })?;
    let endpoint = Endpoint::from_name(action).ok_or_else(|| {
        let names: Vec<&str> = Endpoint::ALL.iter().map(|e| e.name()).collect();
        HttpError(
            404,
            format!("{path}: no such endpoint ({})", names.join(", ")),
        )
    })?;
    let expected = endpoint.method().as_str();
    if method != expected {
        return Err(HttpError(
            405,
            format!("{path} takes {expected}, not {method}"),
        ));
    }
    let json = |example: &str| {
        let example = example.to_string();
        move |e: serde_json::Error| {
            HttpError(
                400,
                format!("{path}: bad JSON body: {e} (expected {example})"),
            )
        }
    };
    Ok(match endpoint {
        Endpoint::VmInfo => ApiRequest::Info,
        Endpoint::VmPause => ApiRequest::Pause,
        Endpoint::VmResume => ApiRequest::Resume,
        Endpoint::VmShutdown => ApiRequest::Shutdown,
        Endpoint::VmSnapshot => ApiRequest::Snapshot(
            serde_json::from_slice(body).map_err(json(SnapshotCreate::EXAMPLE))?,
        ),
        Endpoint::BlockSet => ApiRequest::BlockSet {
            set: serde_json::from_slice(body).map_err(json(BlockSet::EXAMPLE))?,
            file: None,
        },
        Endpoint::BlockClear => {
            ApiRequest::BlockClear(serde_json::from_slice(body).map_err(json(BlockClear::EXAMPLE))?)
        }
        Endpoint::BlockAppend => ApiRequest::BlockAppend {
            set: serde_json::from_slice(body).map_err(json(BlockSet::EXAMPLE))?,
            file: None,
        },
        Endpoint::BlockRemove => ApiRequest::BlockRemove(
            serde_json::from_slice(body).map_err(json(BlockRemove::EXAMPLE))?,
        ),
    })
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        413 => "Payload Too Large",
        503 => "Service Unavailable",
        _ => "Internal Server Error",
    }
}

fn write_response(
    stream: &mut UnixStream,
    status: u16,
    body: Option<String>,
) -> std::io::Result<()> {
    let body = body.unwrap_or_default();
    let mut head = format!("HTTP/1.1 {status} {}\r\n", reason_phrase(status));
    if !body.is_empty() {
        head.push_str("Content-Type: application/json\r\n");
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    stream.write_all(head.as_bytes())?;
    stream.write_all(body.as_bytes())
}

fn error_body(message: &str) -> Option<String> {
    serde_json::to_string(&ErrorBody {
        error: message.into(),
    })
    .ok()
}

fn serve_connection(
    mut stream: UnixStream,
    calls: &mpsc::Sender<ApiCall>,
    wake: &EventFd,
) -> std::io::Result<()> {
    stream.set_read_timeout(Some(READ_TIMEOUT))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    // A descriptor sent with the bytes, for the next request that asks for one.
    let mut passed: Option<std::fs::File> = None;
    loop {
        let parsed = match parse_request(&buf) {
            Ok(p) => p,
            Err(HttpError(status, msg)) => {
                return write_response(&mut stream, status, error_body(&msg));
            }
        };
        let Some((req, used)) = parsed else {
            if buf.len() >= MAX_REQUEST_BYTES {
                return write_response(&mut stream, 413, error_body("request too large"));
            }
            let (n, file) = stream
                .recv_with_fd(&mut chunk)
                .map_err(std::io::Error::from)?;
            if file.is_some() {
                passed = file;
            }
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
            continue;
        };
        buf.drain(..used);
        let routed =
            route(&req.method, &req.path, &req.body).and_then(|r| with_file(r, &mut passed));
        let (status, body) = match routed {
            Err(HttpError(status, msg)) => (status, error_body(&msg)),
            Ok(request) => match call(request, calls, wake) {
                ApiResponse::Info(info) => (200, serde_json::to_string(&info).ok()),
                ApiResponse::Region(region) => (200, serde_json::to_string(&region).ok()),
                ApiResponse::Done => (204, None),
                ApiResponse::Error { status, message } => (status, error_body(&message)),
            },
        };
        write_response(&mut stream, status, body)?;
        if !req.keep_alive {
            return Ok(());
        }
    }
}

/// Gives a `block.set` or `block.append` that asks for a passed file the one that came.
fn with_file(
    request: ApiRequest,
    passed: &mut Option<std::fs::File>,
) -> Result<ApiRequest, HttpError> {
    let (set, append) = match request {
        ApiRequest::BlockSet { set, file: None } if set.fd => (set, false),
        ApiRequest::BlockAppend { set, file: None } if set.fd => (set, true),
        other => return Ok(other),
    };
    let file = passed.take().ok_or_else(|| {
        HttpError(
            400,
            format!(
                "{} for {}: \"fd\": true but no descriptor came with the request; send \
                 the open file with SCM_RIGHTS on the request's bytes",
                if append { "block.append" } else { "block.set" },
                set.path.display()
            ),
        )
    })?;
    let file = Some(PassedFile(std::sync::Arc::new(file)));
    Ok(if append {
        ApiRequest::BlockAppend { set, file }
    } else {
        ApiRequest::BlockSet { set, file }
    })
}

fn call(request: ApiRequest, calls: &mpsc::Sender<ApiCall>, wake: &EventFd) -> ApiResponse {
    let unavailable = || ApiResponse::Error {
        status: 503,
        message: "the VMM is shutting down".into(),
    };
    let (reply, answer) = mpsc::sync_channel(1);
    if calls.send(ApiCall { request, reply }).is_err() || wake.write(1).is_err() {
        return unavailable();
    }
    answer.recv().unwrap_or_else(|_| unavailable())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pipelined_requests_and_waits_for_whole_bodies() {
        let two = b"GET /api/v1/vm.info HTTP/1.1\r\nHost: x\r\n\r\nPUT /api/v1/vm.pause HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}";
        let (first, used) = parse_request(two).unwrap().unwrap();
        assert_eq!(
            (first.method.as_str(), first.path.as_str()),
            ("GET", "/api/v1/vm.info")
        );
        assert!(first.keep_alive);
        let (second, used2) = parse_request(&two[used..]).unwrap().unwrap();
        assert_eq!(second.path, "/api/v1/vm.pause");
        assert_eq!(used + used2, two.len());

        let partial = b"PUT /api/v1/vm.pause HTTP/1.1\r\nContent-Length: 5\r\n\r\n{}";
        assert!(parse_request(partial).unwrap().is_none());
        let close = b"PUT /x HTTP/1.1\r\nConnection: close\r\n\r\n";
        assert!(!parse_request(close).unwrap().unwrap().0.keep_alive);
    }

    #[test]
    fn malformed_and_oversized_requests_are_refused() {
        assert_eq!(
            parse_request(b"\x01\x02 garbage\r\n\r\n").err().unwrap().0,
            400
        );
        let bad_len = b"PUT /x HTTP/1.1\r\nContent-Length: lots\r\n\r\n";
        assert_eq!(parse_request(bad_len).err().unwrap().0, 400);
        let huge = b"PUT /x HTTP/1.1\r\nContent-Length: 999999999\r\n\r\n";
        assert_eq!(parse_request(huge).err().unwrap().0, 413);
    }

    #[test]
    fn a_stream_of_requests_is_taken_one_by_one_until_close() {
        let stream = b"GET /api/v1/vm.info HTTP/1.1\r\n\r\n\
            PUT /api/v1/block.clear HTTP/1.1\r\nContent-Length: 10\r\n\r\n{\"slot\":2}\
            GET /nowhere HTTP/1.1\r\nConnection: close\r\n\r\n\
            GET /api/v1/vm.info HTTP/1.1\r\n\r\n";
        assert_eq!(
            requests_in(stream),
            vec![
                Ok(ApiRequest::Info),
                Ok(ApiRequest::BlockClear(BlockClear { slot: 2 })),
                Err(404)
            ]
        );
        assert_eq!(requests_in(b"\x00garbage\r\n\r\n"), vec![Err(400)]);
        assert_eq!(requests_in(b"GET /api/v1/vm.info HTTP/1.1\r\n"), vec![]);
    }

    /// Serves `request` (sent with `fd`, if any) on a socket pair; returns the request
    /// the event loop got, if any, and the reply's status line.
    fn served(request: &[u8], fd: Option<&std::fs::File>) -> (Option<ApiRequest>, String) {
        use std::io::Read;
        use std::os::fd::AsRawFd;
        let (mut client, server) = UnixStream::pair().unwrap();
        let (calls, incoming) = mpsc::channel();
        let wake = EventFd::new(0).unwrap();
        let server = std::thread::spawn(move || serve_connection(server, &calls, &wake));
        match fd {
            Some(f) => client.send_with_fd(request, f.as_raw_fd()).unwrap(),
            None => client.write(request).unwrap(),
        };
        let got = incoming
            .recv_timeout(Duration::from_secs(5))
            .ok()
            .map(|c: ApiCall| {
                c.reply.send(ApiResponse::Done).unwrap();
                c.request
            });
        let mut reply = String::new();
        client.read_to_string(&mut reply).unwrap();
        server.join().unwrap().unwrap();
        (got, reply.lines().next().unwrap_or_default().to_owned())
    }

    #[test]
    fn block_set_takes_the_descriptor_sent_with_it() {
        use std::os::unix::fs::MetadataExt;
        let image = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
        let body = r#"{"slot": 1, "path": "layer.img", "read_only": true, "fd": true}"#;
        let request = format!(
            "PUT /api/v1/block.set HTTP/1.1\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let (got, status) = served(request.as_bytes(), Some(&image));
        let Some(ApiRequest::BlockSet { file, .. }) = got else {
            panic!("the event loop got {got:?}");
        };
        let passed = file.expect("the descriptor came with the request");
        assert_eq!(
            passed.0.metadata().unwrap().ino(),
            image.metadata().unwrap().ino(),
            "it is the file that was sent"
        );
        assert_eq!(status, "HTTP/1.1 204 No Content");

        // Asked for, not sent: refused before the event loop sees it.
        let (got, status) = served(request.as_bytes(), None);
        assert_eq!(got, None);
        assert!(status.starts_with("HTTP/1.1 400"), "{status}");
    }

    #[test]
    fn routes_name_the_endpoint_and_the_method() {
        assert_eq!(route("GET", "/api/v1/vm.info", b""), Ok(ApiRequest::Info));
        assert_eq!(
            route("PUT", "/api/v1/vm.shutdown", b""),
            Ok(ApiRequest::Shutdown)
        );
        let e = route("GET", "/api/v1/vm.pause", b"").unwrap_err();
        assert_eq!(e.0, 405);
        assert!(e.1.contains("takes PUT"));
        assert_eq!(route("GET", "/api/v1/vm.nope", b"").unwrap_err().0, 404);
        assert_eq!(route("GET", "/vm.info", b"").unwrap_err().0, 404);
    }

    #[test]
    fn block_requests_carry_their_json_bodies() {
        assert_eq!(
            route(
                "PUT",
                "/api/v1/block.set",
                br#"{"slot": 2, "path": "/l.img", "read_only": true, "id": "layer0"}"#
            ),
            Ok(ApiRequest::BlockSet {
                set: BlockSet {
                    slot: 2,
                    path: "/l.img".into(),
                    read_only: true,
                    id: Some("layer0".into()),
                    fd: false,
                },
                file: None,
            })
        );
        assert_eq!(
            route("PUT", "/api/v1/block.clear", br#"{"slot": 0}"#),
            Ok(ApiRequest::BlockClear(BlockClear { slot: 0 }))
        );
        let e = route("PUT", "/api/v1/block.set", br#"{"slot": 1}"#).unwrap_err();
        assert_eq!(e.0, 400);
        assert!(
            e.1.contains("missing field `path`") && e.1.contains("expected {"),
            "{}",
            e.1
        );
        let e = route("PUT", "/api/v1/block.clear", br#"{"slot": 1, "x": 2}"#).unwrap_err();
        assert!(e.1.contains("unknown field `x`"), "{}", e.1);
    }

    #[test]
    fn store_requests_carry_their_bodies_and_a_missing_file_is_named() {
        let body = br#"{"slot": 0, "path": "/u.img", "id": "store", "fd": true}"#;
        let Ok(ApiRequest::BlockAppend { set, file: None }) =
            route("PUT", "/api/v1/block.append", body)
        else {
            panic!("block.append routes to BlockAppend");
        };
        assert_eq!((set.slot, set.fd, set.read_only), (0, true, false));
        // The descriptor it asks for did not come.
        let e = with_file(
            ApiRequest::BlockAppend {
                set: set.clone(),
                file: None,
            },
            &mut None,
        )
        .unwrap_err();
        assert_eq!(e.0, 400);
        assert!(e.1.starts_with("block.append for /u.img"), "{}", e.1);
        // The one that came is taken.
        let mut passed = Some(std::fs::File::open("/dev/null").unwrap());
        let Ok(ApiRequest::BlockAppend { file: Some(_), .. }) =
            with_file(ApiRequest::BlockAppend { set, file: None }, &mut passed)
        else {
            panic!("the passed file goes with the request");
        };
        assert!(passed.is_none());
        assert_eq!(
            route(
                "PUT",
                "/api/v1/block.remove",
                br#"{"slot": 0, "start_sector": 2048}"#
            ),
            Ok(ApiRequest::BlockRemove(BlockRemove {
                slot: 0,
                start_sector: 2048
            }))
        );
        let e = route("PUT", "/api/v1/block.remove", br#"{"slot": 0}"#).unwrap_err();
        assert!(e.1.contains("start_sector"), "{}", e.1);
    }

    #[test]
    fn a_stale_socket_file_is_replaced_and_removed_on_drop() {
        let dir = std::env::temp_dir().join(format!("peapod-api-test-{}", std::process::id()));
        let path = dir.join("a/vmm.sock");
        let first = ApiSocket::bind(&path).unwrap();
        assert!(matches!(ApiSocket::bind(&path), Err(ApiError::InUse(_))));
        drop(first);
        assert!(!path.exists());
        // What a killed VMM leaves: the file, and nobody listening on it.
        drop(UnixListener::bind(&path).unwrap());
        let second = ApiSocket::bind(&path).unwrap();
        assert!(path.exists());
        drop(second);
        assert!(!path.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
