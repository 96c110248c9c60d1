//! Container start benchmark: in one guest, the time from CreateContainer to the
//! container's first byte of output, split into create and start-to-output, for a
//! busybox container (`echo`) on an EROFS (or ext4) layer and a tmpfs upper.
//!
//! Then, in a second guest whose agent runs under strace (`peapod.strace=`, from an
//! initramfs built by `rootfs/build-test.sh --with-strace`), one container again: the
//! system calls the agent and the processes it starts make from boot to the first
//! output, as strace's table. Every guest system call costs about a thousand times its
//! native price on this kind of host, so that count is what to drive down.
//!
//! `make bench` (which builds that initramfs), or `cargo bench -p peapod-tests --bench
//! agent` with PEAPOD_INITRD pointing at it; PEAPOD_BENCH_RUNS sets the number of timed
//! containers (default 5).

use std::io::Read;
use std::time::{Duration, Instant};

use peapod_agent_protocol::{
    rootfs, CreateContainerRequest, MessageField, Rootfs, Stdio, StdioStream,
};
use peapod_tests::agent::{attach, AgentConn, GuestLog};
use peapod_tests::layers::{busybox_layer_any, oci_spec, to_bytes, DiskImage};
use peapod_tests::{require_kvm, VmmOptions, VmmProcess, BOOT_TIMEOUT};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// A guest with the busybox layer in slot 0, and a connection to its agent.
fn boot(uds: &std::path::Path, layer: &DiskImage, cmdline: &str) -> (VmmProcess, AgentConn) {
    let vsock = format!("cid=3,socket={}", uds.display());
    let mut args = vec!["--memory", "256", "--block-slots", "1", "--vsock", &vsock];
    if !cmdline.is_empty() {
        args.extend(["--cmdline", cmdline]);
    }
    let vm = VmmProcess::start_with(&args, VmmOptions::default());
    let conn = AgentConn::connect(uds, BOOT_TIMEOUT).expect("the agent answers");
    vm.api()
        .block_set(&layer.block_set(0, true))
        .unwrap_or_else(|e| panic!("block.set: {e}"));
    (vm, conn)
}

/// Creates and starts an `echo` container; returns (create, start to first output).
fn run_echo(
    conn: &AgentConn,
    uds: &std::path::Path,
    layer: &DiskImage,
    id: &str,
) -> (Duration, Duration) {
    let mut req = CreateContainerRequest::new();
    req.container_id = id.into();
    req.oci_spec = to_bytes(&oci_spec(&["echo", "ready"], false));
    let mut r = Rootfs::new();
    r.layers = vec![layer.disk()];
    r.upper = Some(rootfs::Upper::UpperTmpfsBytes(16 << 20));
    req.rootfs = MessageField::some(r);
    let mut s = Stdio::new();
    s.stdout = true;
    req.stdio = MessageField::some(s);
    let t0 = Instant::now();
    conn.create_container(&req).expect("CreateContainer");
    let created = t0.elapsed();
    let mut out = attach(uds, StdioStream::Stdout, id, "").expect("attach stdout");
    let t1 = Instant::now();
    conn.start_container(&AgentConn::container(id))
        .expect("StartContainer");
    let mut first = [0u8; 1];
    out.read_exact(&mut first)
        .expect("the container's first byte");
    (created, t1.elapsed())
}

fn main() {
    require_kvm();
    let runs: usize = std::env::var("PEAPOD_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let files = tempfile::tempdir().unwrap();
    let layer = busybox_layer_any(files.path());

    let uds = files.path().join("timed.sock");
    let (mut vm, conn) = boot(&uds, &layer, "");
    let (mut create, mut to_output, mut total) = (Vec::new(), Vec::new(), Vec::new());
    for n in 0..runs {
        let id = format!("bench{n}");
        let (created, output) = run_echo(&conn, &uds, &layer, &id);
        let mut r = peapod_agent_protocol::RemoveContainerRequest::new();
        r.container_id = id;
        conn.remove_container(&r).expect("RemoveContainer");
        println!(
            "container {n}: create {:.0} ms, start to first output {:.0} ms, total {:.0} ms",
            created.as_secs_f64() * 1e3,
            output.as_secs_f64() * 1e3,
            (created + output).as_secs_f64() * 1e3
        );
        create.push(created);
        to_output.push(output);
        total.push(created + output);
    }
    println!(
        "median of {runs}: CreateContainer {:.0} ms + StartContainer to first output {:.0} ms = CreateContainer to first output {:.0} ms",
        median(create).as_secs_f64() * 1e3,
        median(to_output).as_secs_f64() * 1e3,
        median(total).as_secs_f64() * 1e3
    );
    let _ = conn.destroy_sandbox();
    drop(conn);
    vm.wait_exit(Duration::from_secs(60));

    // The count, under strace, in a guest of its own.
    const STRACE: &str = "peapod.strace=/usr/bin/strace";
    let uds = files.path().join("counted.sock");
    let (mut vm, mut conn) = boot(&uds, &layer, STRACE);
    // Every traced system call stops the guest's only vCPU for strace.
    conn.set_timeout(Duration::from_secs(1800));
    let log = GuestLog::attach(&uds).expect("the agent's log");
    run_echo(&conn, &uds, &layer, "counted");
    let _ = conn
        .with_timeout(Duration::from_secs(120))
        .call(|c, ctx| async move {
            c.destroy_sandbox(ctx, &peapod_agent_protocol::DestroySandboxRequest::new())
                .await
        });
    drop(conn);
    vm.wait_exit(Duration::from_secs(120));
    std::thread::sleep(Duration::from_secs(1));
    let table: Vec<String> = log
        .text()
        .lines()
        .filter_map(|l| l.split_once(" strace: ").map(|(_, t)| t.to_owned()))
        .collect();
    assert!(
        table.iter().any(|l| l.contains("total")),
        "no strace table in the agent's log (is PEAPOD_INITRD built with --with-strace?):\n{}",
        log.text()
    );
    println!(
        "system calls from boot to one container's first output (strace -f -c, in the guest):"
    );
    for line in table {
        println!("  {line}");
    }
}
