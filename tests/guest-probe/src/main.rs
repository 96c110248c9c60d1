//! peapod-probe: PID 1 of the test guest.
//!
//! `no_main` for the agent's reason (guest-agent/src/main.rs): PID 1 may start with
//! fds 0-2 closed, and Rust's runtime would abort filling them before `main`.
//!
//! PID 1 forks one server process and then only reaps: orphans land on PID 1, and a
//! reaper that waits for any child would steal the exit status that `SH` waits for.
//! Were the server to die, PID 1 starts another.
#![cfg_attr(not(test), no_main)]

#[cfg_attr(test, allow(dead_code))]
mod init;

#[cfg(not(test))]
#[no_mangle]
extern "C" fn main(
    _argc: std::ffi::c_int,
    _argv: *const *const std::ffi::c_char,
) -> std::ffi::c_int {
    use nix::sys::signal::{signal, SigHandler, Signal};
    use nix::sys::wait::{wait, WaitStatus};
    use nix::unistd::{fork, ForkResult};

    // Without Rust's runtime SIGPIPE still kills: a peer that hangs up would take the
    // server with it. Children get the default back (std resets it on exec).
    // SAFETY: SIG_IGN is not a handler function; nothing else sets signals yet.
    let _ = unsafe { signal(Signal::SIGPIPE, SigHandler::SigIgn) };

    if std::process::id() != 1 {
        // Outside a guest (by hand, for debugging): just serve.
        serve();
    }
    peapod_agent::init::mount_filesystems();
    peapod_agent::init::standard_fds();
    if let Err(e) = init::loopback_up() {
        init::say(&format!("cannot bring lo up: {e}"));
    }

    loop {
        // SAFETY: PID 1 is single-threaded here (it never starts a thread), so the
        // child may run anything.
        let server = match unsafe { fork() } {
            Ok(ForkResult::Child) => serve(),
            Ok(ForkResult::Parent { child }) => child,
            Err(e) => {
                init::say(&format!("cannot fork the server: {e}; retrying"));
                std::thread::sleep(std::time::Duration::from_secs(1));
                continue;
            }
        };
        loop {
            match wait() {
                Ok(WaitStatus::Exited(pid, code)) if pid == server => {
                    init::say(&format!("server exited with {code}; restarting it"));
                    break;
                }
                Ok(WaitStatus::Signaled(pid, sig, _)) if pid == server => {
                    init::say(&format!("server killed by {sig}; restarting it"));
                    break;
                }
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => {
                    init::say(&format!("wait: {e}"));
                    std::thread::sleep(std::time::Duration::from_secs(1));
                }
            }
        }
    }
}

/// The server process: the vsock and TCP listeners, then the boot-time command if
/// the kernel command line has one.
#[cfg(not(test))]
fn serve() -> ! {
    use peapod_guest_probe::serve::{serve_forever, Config, PORT};
    use peapod_guest_probe::sock::Listener;

    let cfg = Config::guest();
    let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
        if let Err(e) = std::thread::Builder::new().name(name.into()).spawn(f) {
            init::say(&format!("cannot start the {name} thread: {e}"));
        }
    };
    match std::net::TcpListener::bind(("0.0.0.0", PORT as u16)) {
        Ok(l) => {
            let cfg = cfg.clone();
            spawn("tcp", Box::new(move || serve_forever(l.into(), cfg, log)));
        }
        Err(e) => init::say(&format!("cannot listen on TCP port {PORT}: {e}")),
    }
    let vsock_cfg = cfg.clone();
    spawn(
        "vsock",
        Box::new(move || {
            for attempt in 0.. {
                match Listener::vsock(PORT) {
                    Ok(l) => {
                        init::say(&format!("listening on vsock and TCP port {PORT}"));
                        serve_forever(l, vsock_cfg, log)
                    }
                    Err(e) => {
                        // No vsock device (yet): keep trying, slowly, and say so once.
                        if attempt == 0 {
                            init::say(&format!(
                                "cannot listen on vsock port {PORT}: {e}; retrying"
                            ));
                        }
                        std::thread::sleep(std::time::Duration::from_secs(5));
                    }
                }
            }
        }),
    );

    // `peapod_probe_sh=<command>` on the kernel command line (in double quotes if it
    // has spaces; no double quotes inside) reaches PID 1 as an environment variable.
    // Its output goes to the console: for looking at a test guest by hand.
    if let Ok(cmd) = std::env::var("peapod_probe_sh") {
        init::say(&format!("running {cmd:?}"));
        match std::process::Command::new(&cfg.shell[0])
            .args(&cfg.shell[1..])
            .arg("-c")
            .arg(&cmd)
            .env_clear()
            .env("PATH", "/bin:/sbin:/usr/bin:/usr/sbin")
            .status()
        {
            Ok(s) => init::say(&format!("boot command ended: {s}")),
            Err(e) => init::say(&format!("cannot run the boot command: {e}")),
        }
    }
    loop {
        std::thread::park();
    }
}

#[cfg(not(test))]
fn log(msg: &str) {
    init::say(msg)
}
