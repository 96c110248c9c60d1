//! One command per connection; the first line says which.
//!
//! | command | reply |
//! |---|---|
//! | `PING` | `PONG` |
//! | `SH <command>` | the shell's stdout and stderr, then `EXIT <code>`; the shell's stdin is the rest of the connection |
//! | `ECHO` | every byte after the line, back, until EOF |
//! | `VSOCK-ECHO <port> <connections> <bytes>` | `OK <total>` or `ERR <reason>` |
//! | `TCP-ECHO <ip:port> <bytes>` | `OK <bytes>` or `ERR <reason>` |
//!
//! Anything else, or a line over [`MAX_LINE`] bytes, gets `ERR <reason>`.

use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::echo::echo_check;
use crate::sock::{Listener, Sock, HOST_CID};

/// The port the probe listens on, over vsock and over TCP.
pub const PORT: u32 = 5000;
/// Longest command line accepted, newline excluded.
pub const MAX_LINE: usize = 4096;
/// Most concurrent connections one `VSOCK-ECHO` may open.
pub const MAX_CONNECTIONS: u32 = 256;
/// Most bytes one echo stream may carry.
pub const MAX_BYTES: u64 = 1 << 30;

#[derive(Debug, PartialEq, Eq)]
pub enum Request {
    Ping,
    Sh(String),
    Echo,
    VsockEcho {
        port: u32,
        connections: u32,
        bytes: u64,
    },
    TcpEcho {
        addr: SocketAddr,
        bytes: u64,
    },
}

pub fn parse(line: &str) -> Result<Request, String> {
    let (word, rest) = line.split_once(' ').unwrap_or((line, ""));
    let args: Vec<&str> = rest.split_whitespace().collect();
    let arity = |n: usize, usage: &str| {
        if args.len() == n {
            Ok(())
        } else {
            Err(format!("usage: {usage}"))
        }
    };
    match word {
        "PING" => arity(0, "PING").map(|_| Request::Ping),
        "ECHO" => arity(0, "ECHO").map(|_| Request::Echo),
        "SH" if rest.trim().is_empty() => Err("usage: SH <shell command>".into()),
        "SH" => Ok(Request::Sh(rest.to_string())),
        "VSOCK-ECHO" => {
            arity(3, "VSOCK-ECHO <port> <connections> <bytes>")?;
            let connections = number(args[1], "connections", 1, MAX_CONNECTIONS.into())?;
            Ok(Request::VsockEcho {
                port: number(args[0], "port", 0, u32::MAX.into())? as u32,
                connections: connections as u32,
                bytes: number(args[2], "bytes", 0, MAX_BYTES)?,
            })
        }
        "TCP-ECHO" => {
            arity(2, "TCP-ECHO <ip:port> <bytes>")?;
            Ok(Request::TcpEcho {
                addr: args[0]
                    .parse()
                    .map_err(|e| format!("address {:?}: {e} (want ip:port)", args[0]))?,
                bytes: number(args[1], "bytes", 0, MAX_BYTES)?,
            })
        }
        _ => Err(format!(
            "unknown command {word:?} (PING, SH, ECHO, VSOCK-ECHO, TCP-ECHO)"
        )),
    }
}

fn number(s: &str, what: &str, min: u64, max: u64) -> Result<u64, String> {
    match s.parse::<u64>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(format!("{what} {s:?}: want a number from {min} to {max}")),
    }
}

/// How commands run: the shell, and how long network waits may last.
#[derive(Clone, Debug)]
pub struct Config {
    /// Program and leading arguments of the shell; `-c <command>` is appended.
    pub shell: Vec<OsString>,
    /// Read/write timeout of every socket the probe opens or serves, so that a lost
    /// peer ends a command with an error instead of hanging it.
    pub io_timeout: Duration,
}

impl Config {
    /// The test guest's: Debian's static busybox, and waits long enough for a guest
    /// whose kernel is emulated (every syscall ~1000x its native cost).
    pub fn guest() -> Self {
        Config {
            shell: vec!["/bin/busybox".into(), "sh".into()],
            io_timeout: Duration::from_secs(120),
        }
    }
}

/// Reads the command line and not a byte more: what follows is an `ECHO`'s data or
/// an `SH`'s stdin, and stays in the socket. Peeks, then takes what it saw up to
/// the newline (one byte at a time would cost a guest syscall per byte).
fn read_line(sock: &mut Sock) -> Result<String, String> {
    let mut line = Vec::with_capacity(256);
    let mut chunk = [0u8; 1024];
    while line.len() <= MAX_LINE {
        let n = match sock.peek(&mut chunk) {
            Ok(0) => return Err("connection ended before a command line".into()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("reading the command line: {e}")),
        };
        let end = chunk[..n].iter().position(|&b| b == b'\n');
        let take = end.map_or(n, |i| i + 1);
        sock.read_exact(&mut chunk[..take])
            .map_err(|e| format!("reading the command line: {e}"))?;
        line.extend_from_slice(&chunk[..take]);
        if end.is_some() {
            line.pop();
            if line.len() > MAX_LINE {
                break;
            }
            let line = String::from_utf8(line).map_err(|_| "command line is not UTF-8")?;
            return Ok(line.trim_end_matches('\r').to_string());
        }
    }
    Err(format!("command line longer than {MAX_LINE} bytes"))
}

/// Serves one connection to its end. Errors go to the peer; there is no one else to
/// tell.
pub fn serve_connection(mut sock: Sock, cfg: &Config) {
    let _ = sock.set_timeout(Some(cfg.io_timeout));
    let line = match read_line(&mut sock) {
        Ok(x) => x,
        Err(e) => return reply(&mut sock, &format!("ERR {e}")),
    };
    match parse(&line) {
        Err(e) => reply(&mut sock, &format!("ERR {e}")),
        Ok(Request::Ping) => reply(&mut sock, "PONG"),
        Ok(Request::Echo) => echo_back(sock),
        Ok(Request::Sh(cmd)) => {
            // A shell may run for long without output (dd of a disk): no timeout.
            let _ = sock.set_timeout(None);
            let text = match run_shell(&sock, &cmd, cfg) {
                Ok(code) => format!("EXIT {code}"),
                Err(e) => format!("ERR {e}"),
            };
            reply(&mut sock, &text)
        }
        Ok(Request::VsockEcho {
            port,
            connections,
            bytes,
        }) => {
            let r = vsock_echo(port, connections, bytes, cfg);
            reply(&mut sock, &ok_or_err(r))
        }
        Ok(Request::TcpEcho { addr, bytes }) => {
            let r = tcp_echo(addr, bytes, cfg);
            reply(&mut sock, &ok_or_err(r))
        }
    }
}

fn ok_or_err(r: Result<u64, String>) -> String {
    match r {
        Ok(n) => format!("OK {n}"),
        Err(e) => format!("ERR {e}"),
    }
}

fn reply(sock: &mut Sock, line: &str) {
    let _ = sock.write_all(format!("{line}\n").as_bytes());
}

fn echo_back(mut sock: Sock) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match sock.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if sock.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// Runs `cmd` with stdin, stdout and stderr on the connection (the host sends the
/// shell its input after the command line, or shuts down its write side). Returns the exit code, or 128 + the signal that killed the shell.
fn run_shell(sock: &Sock, cmd: &str, cfg: &Config) -> Result<i32, String> {
    let (program, args) = cfg
        .shell
        .split_first()
        .ok_or("no shell configured in the probe")?;
    let fd = |what| {
        sock.dup_fd()
            .map(Stdio::from)
            .map_err(|e| format!("cannot give the shell the connection as {what}: {e}"))
    };
    let status = Command::new(program)
        .args(args)
        .arg("-c")
        .arg(cmd)
        .env_clear()
        .env("PATH", "/bin:/sbin:/usr/bin:/usr/sbin")
        .stdin(fd("stdin")?)
        .stdout(fd("stdout")?)
        .stderr(fd("stderr")?)
        .status()
        .map_err(|e| format!("cannot run {}: {e}", program.to_string_lossy()))?;
    use std::os::unix::process::ExitStatusExt;
    Ok(status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(-1))
}

/// Runs `f` for each index on its own thread; returns the sum, or the first error.
fn concurrently(
    n: u32,
    f: impl Fn(u32) -> Result<u64, String> + Send + Sync + 'static,
) -> Result<u64, String> {
    let f = std::sync::Arc::new(f);
    let mut handles = Vec::new();
    for i in 0..n {
        let f = f.clone();
        let h = std::thread::Builder::new()
            .name(format!("echo-{i}"))
            .stack_size(128 * 1024)
            .spawn(move || f(i))
            .map_err(|e| format!("cannot start thread {i} of {n}: {e}"))?;
        handles.push(h);
    }
    let mut total = 0;
    let mut first_err = None;
    for h in handles {
        match h.join() {
            Ok(Ok(b)) => total += b,
            Ok(Err(e)) => {
                first_err.get_or_insert(e);
            }
            Err(_) => {
                first_err.get_or_insert("an echo thread panicked".into());
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(total),
    }
}

fn vsock_echo(port: u32, connections: u32, bytes: u64, cfg: &Config) -> Result<u64, String> {
    let timeout = cfg.io_timeout;
    concurrently(connections, move |i| {
        let sock = Sock::vsock_connect(HOST_CID, port, timeout).map_err(|e| {
            format!("connection {i}: cannot connect to vsock CID {HOST_CID} port {port}: {e}")
        })?;
        sock.set_timeout(Some(timeout))
            .map_err(|e| format!("connection {i}: setting timeouts: {e}"))?;
        echo_check(sock, i, bytes)
    })
}

fn tcp_echo(addr: SocketAddr, bytes: u64, cfg: &Config) -> Result<u64, String> {
    let stream = TcpStream::connect_timeout(&addr, cfg.io_timeout)
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    let sock = Sock::from(stream);
    sock.set_timeout(Some(cfg.io_timeout))
        .map_err(|e| format!("{addr}: setting timeouts: {e}"))?;
    echo_check(sock, 0, bytes)
}

/// Accepts connections for ever, one thread each. Errors are reported through
/// `log` and do not stop the loop.
pub fn serve_forever(listener: Listener, cfg: Config, log: fn(&str)) -> ! {
    let cfg = std::sync::Arc::new(cfg);
    loop {
        match listener.accept() {
            Ok(sock) => {
                let cfg = cfg.clone();
                let spawned = std::thread::Builder::new()
                    .name("probe-conn".into())
                    .stack_size(256 * 1024)
                    .spawn(move || serve_connection(sock, &cfg));
                if let Err(e) = spawned {
                    log(&format!("cannot start a thread for a connection: {e}"));
                }
            }
            Err(e) => {
                log(&format!("accept failed: {e}"));
                // EMFILE and friends: give whatever holds the resources time to end.
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::os::unix::net::{UnixListener, UnixStream};

    fn cfg() -> Config {
        Config {
            shell: vec!["/bin/sh".into()],
            io_timeout: Duration::from_secs(20),
        }
    }

    /// Sends `request` over a socketpair served by `serve_connection`; returns the reply.
    fn ask_bytes(request: &[u8]) -> Vec<u8> {
        let (mut a, b) = UnixStream::pair().unwrap();
        let server = std::thread::spawn(move || serve_connection(b.into(), &cfg()));
        a.write_all(request).unwrap();
        a.shutdown(std::net::Shutdown::Write).unwrap();
        let mut out = Vec::new();
        a.read_to_end(&mut out).unwrap();
        server.join().unwrap();
        out
    }

    fn ask(request: &[u8]) -> String {
        String::from_utf8(ask_bytes(request)).unwrap()
    }

    #[test]
    fn parses_each_command_and_refuses_bad_ones() {
        assert_eq!(parse("PING"), Ok(Request::Ping));
        assert_eq!(parse("SH echo a  b"), Ok(Request::Sh("echo a  b".into())));
        assert_eq!(
            parse("VSOCK-ECHO 6000 16 1048576"),
            Ok(Request::VsockEcho {
                port: 6000,
                connections: 16,
                bytes: 1 << 20
            })
        );
        assert_eq!(
            parse("TCP-ECHO 10.0.0.1:7 8"),
            Ok(Request::TcpEcho {
                addr: "10.0.0.1:7".parse().unwrap(),
                bytes: 8
            })
        );
        for (bad, why) in [
            ("SH", "usage: SH"),
            ("SH   ", "usage: SH"),
            ("ECHO x", "usage: ECHO"),
            ("VSOCK-ECHO 1 2", "usage: VSOCK-ECHO"),
            ("VSOCK-ECHO 1 0 5", "connections \"0\""),
            ("VSOCK-ECHO 1 9999 5", "connections \"9999\""),
            ("VSOCK-ECHO x 1 5", "port \"x\""),
            ("TCP-ECHO 10.0.0.1 5", "want ip:port"),
            ("TCP-ECHO 10.0.0.1:7 -1", "bytes \"-1\""),
            ("ping", "unknown command \"ping\""),
            ("", "unknown command \"\""),
        ] {
            let err = parse(bad).unwrap_err();
            assert!(err.contains(why), "{bad:?}: {err}");
        }
    }

    #[test]
    fn ping_gets_pong() {
        assert_eq!(ask(b"PING\n"), "PONG\n");
    }

    #[test]
    fn sh_sends_stdout_stderr_and_the_exit_code() {
        let out = ask(b"SH echo out; echo err >&2; exit 3\n");
        assert_eq!(out, "out\nerr\nEXIT 3\n");
    }

    #[test]
    fn sh_reads_the_rest_of_the_connection_as_stdin() {
        let input = "line one\nline two\n".repeat(5000);
        let out = ask(format!("SH wc -l\n{input}").as_bytes());
        assert_eq!(
            out.split_whitespace().collect::<Vec<_>>(),
            ["10000", "EXIT", "0"]
        );
    }

    #[test]
    fn sh_reports_death_by_signal_as_128_plus_the_signal() {
        assert_eq!(ask(b"SH kill -9 $$\n"), "EXIT 137\n");
    }

    #[test]
    fn sh_with_a_missing_shell_says_so() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let mut c = cfg();
        c.shell = vec!["/nonexistent/busybox".into(), "sh".into()];
        std::thread::spawn(move || serve_connection(b.into(), &c));
        a.write_all(b"SH true\n").unwrap();
        let mut out = String::new();
        a.read_to_string(&mut out).unwrap();
        assert!(
            out.starts_with("ERR cannot run /nonexistent/busybox:"),
            "{out}"
        );
    }

    #[test]
    fn echo_returns_data_sent_with_the_command_line_and_after_it() {
        let data = b"hello, probe\0\xff\n more";
        assert_eq!(ask_bytes(&[b"ECHO\n".as_slice(), data].concat()), data);
    }

    #[test]
    fn echo_carries_a_megabyte_intact() {
        let (mut a, b) = UnixStream::pair().unwrap();
        std::thread::spawn(move || serve_connection(b.into(), &cfg()));
        a.write_all(b"ECHO\n").unwrap();
        assert_eq!(crate::echo::echo_check(a.into(), 9, 1 << 20), Ok(1 << 20));
    }

    #[test]
    fn bad_lines_get_err_replies() {
        assert!(ask(b"FROB 1\n").starts_with("ERR unknown command \"FROB\""));
        assert!(ask(b"PING").starts_with("ERR connection ended before a command line"));
        assert!(ask(b"\xff\xfe\n").starts_with("ERR command line is not UTF-8"));
        let long = format!("SH {}\n", "x".repeat(MAX_LINE));
        assert_eq!(
            ask(long.as_bytes()),
            format!("ERR command line longer than {MAX_LINE} bytes\n")
        );
        // Exactly MAX_LINE is still accepted.
        let fits = format!("SH :{}\n", " ".repeat(MAX_LINE - 4));
        assert_eq!(ask(fits.as_bytes()), "EXIT 0\n");
    }

    fn tcp_echo_server() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let mut s = s.unwrap();
                let mut r = s.try_clone().unwrap();
                std::thread::spawn(move || std::io::copy(&mut r, &mut s));
            }
        });
        addr
    }

    #[test]
    fn tcp_echo_checks_a_real_tcp_echo() {
        let addr = tcp_echo_server();
        assert_eq!(
            ask(format!("TCP-ECHO {addr} 2000000\n").as_bytes()),
            "OK 2000000\n"
        );
    }

    #[test]
    fn tcp_echo_to_a_closed_port_is_an_error() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let out = ask(format!("TCP-ECHO {addr} 10\n").as_bytes());
        assert!(
            out.starts_with(&format!("ERR cannot connect to {addr}:")),
            "{out}"
        );
    }

    #[test]
    fn the_server_keeps_serving_after_bad_commands() {
        let dir = std::env::temp_dir().join(format!("probe-serve-{}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        let listener = UnixListener::bind(&dir).unwrap();
        std::thread::spawn(move || serve_forever(listener.into(), cfg(), |_| {}));
        let talk = |req: &[u8]| {
            let mut s = UnixStream::connect(&dir).unwrap();
            s.write_all(req).unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            out
        };
        assert!(talk(b"NOPE\n").starts_with("ERR unknown command"));
        assert!(talk(&[b'x'; MAX_LINE + 10]).starts_with("ERR command line longer"));
        // A client that connects and hangs up at once.
        drop(UnixStream::connect(&dir).unwrap());
        assert_eq!(talk(b"PING\n"), "PONG\n");
        assert_eq!(talk(b"SH echo still here\n"), "still here\nEXIT 0\n");
        std::fs::remove_file(&dir).unwrap();
    }
}
