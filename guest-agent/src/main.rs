//! peapod-agent: `/init` of the Peapod guest.
//!
//! It prepares the guest (file systems, stdio, its log), then serves the agent API
//! over ttrpc on vsock port 1024 until the host destroys the sandbox, and powers the
//! VM off. With `peapod.poweroff=ready` on the kernel command line it powers off as
//! soon as it is ready (boot tests and benchmarks).
//!
//! `no_main`: with the VM's console off the kernel starts PID 1 with fds 0-2 closed,
//! and Rust's runtime, before `main`, would fill them from /dev/null, which does not
//! exist until the agent mounts /dev, and abort. PID 1 dying panics the kernel, so
//! the agent starts from the C entry point and sets up its fds itself.
#![cfg_attr(not(test), no_main)]

#[cfg(not(test))]
use peapod_agent::{init, server::AgentService};

#[cfg(not(test))]
#[no_mangle]
extern "C" fn main(
    _argc: std::ffi::c_int,
    _argv: *const *const std::ffi::c_char,
) -> std::ffi::c_int {
    use std::io::Write;
    if std::process::id() != 1 {
        eprintln!("peapod-agent: must run as PID 1, the guest's /init");
        return 1;
    }
    let rooted = init::leave_rootfs();
    init::mount_filesystems();
    init::standard_fds();
    let mut console = init::Console::open();
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let log_lines = peapod_agent::log::init(&peapod_agent::log::LogConfig::from_cmdline(&cmdline));
    if let Err(e) = rooted {
        log::error!("cannot leave the initramfs root, containers will not start: {e}");
    }
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_else(|e| format!("unknown({e})"));

    if init::poweroff_requested(&cmdline) {
        let _ = writeln!(console, "peapod-agent: ready kernel={release}");
        init::power_off(&mut console);
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = writeln!(console, "peapod-agent: cannot start its runtime: {e}");
            init::power_off(&mut console);
        }
    };
    runtime.block_on(async {
        tokio::spawn(peapod_agent::log::serve(log_lines));
        tokio::spawn(peapod_agent::log::forward_kernel_messages());
        match serve(&cmdline, &release).await {
            Ok(()) => log::info!("sandbox destroyed, powering off"),
            Err(e) => {
                log::error!("{e}");
                let _ = writeln!(console, "peapod-agent: {e}");
            }
        }
    });
    init::power_off(&mut console);
}

/// Serves the API until DestroySandbox has been answered.
#[cfg(not(test))]
async fn serve(cmdline: &str, release: &str) -> Result<(), String> {
    let trace = peapod_agent::trace::SyscallTrace::from_cmdline(cmdline);
    let service =
        AgentService::start(trace).map_err(|e| format!("cannot start the agent service: {e}"))?;
    let destroyed = service.destroyed.clone();
    let address = format!("vsock://-1:{}", peapod_agent_protocol::AGENT_PORT);
    let mut server = peapod_agent_protocol::ttrpc::r#async::Server::new()
        .bind(&address)
        .map_err(|e| format!("cannot listen on {address}: {e}"))?
        .register_service(peapod_agent_protocol::create_agent(service));
    server
        .start()
        .await
        .map_err(|e| format!("cannot serve on {address}: {e}"))?;
    log::info!("ready kernel={release}, serving on {address}");
    {
        use std::io::Write;
        let _ = writeln!(
            init::Console::open(),
            "peapod-agent: ready kernel={release}"
        );
    }
    destroyed.notified().await;
    // A graceful shutdown lets the reply to DestroySandbox reach the host before
    // the VM goes; bounded, in case a host connection hangs.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), server.shutdown()).await;
    Ok(())
}
