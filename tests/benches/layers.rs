//! Images of many layers over CRI, peapod against runc on the same containerd in one
//! run (src/kubelet.rs plays the kubelet):
//!
//! - container start time, CreateContainer to the container's first line in its CRI
//!   log, for an image of 1 layer and one of 40: the first container of an image (peapod
//!   builds the image's merged disk then) and a second one (the disk is cached);
//! - host memory of two idle peapod pods of the same image against two of different
//!   images: what the layer cache's files hold in the host's page cache (`fincore`),
//!   and the VMMs' PSS.
//!
//! `cargo bench -p peapod-tests --bench layers` as root with the artefacts in the
//! environment (as `make test` sets them); `make bench` runs it too.

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use peapod_tests::cri::PEAPOD_HANDLER;
use peapod_tests::kubelet::{ContainerSpec, Node, Pod};
use peapod_tests::leftovers::HostState;
use peapod_tests::memory::pss_kib;
use peapod_tests::oci_image::layered_image_tar;

const ONE: &str = "docker.io/peapod/one-layer:bench";
const DEEP: &str = "docker.io/peapod/forty-layers:bench";
const DEEP_LAYERS: usize = 40;
const VMM: &str = "peapod-vmm";

/// CreateContainer to the first output of a container of `image` in `pod`.
fn start(node: &Node, pod: &Pod, image: &str, name: &str) -> Duration {
    let t0 = Instant::now();
    let c = node.run_container(
        pod,
        &ContainerSpec::shell(name, "echo first-output; exec sleep 3600").image(image),
    );
    node.wait_log(&c, "first-output");
    t0.elapsed()
}

/// The layer cache's image files.
fn cache_files(node: &Node) -> Vec<PathBuf> {
    std::fs::read_dir(&node.ctd.layer_cache)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "erofs" || x == "ext4"))
                .collect()
        })
        .unwrap_or_default()
}

/// Drops the page cache of the layer cache's files (clean pages: fadvise DONTNEED).
fn evict(node: &Node) {
    for f in cache_files(node) {
        if let Ok(file) = std::fs::File::open(&f) {
            // SAFETY: posix_fadvise(2) on a descriptor we own; it touches no memory.
            unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        }
    }
}

/// Bytes of the layer cache's files in the host's page cache.
fn cached_bytes(node: &Node) -> u64 {
    let files = cache_files(node);
    if files.is_empty() {
        return 0;
    }
    let out = Command::new("fincore")
        .args(["--bytes", "--noheadings", "--output", "RES"])
        .args(&files)
        .output()
        .expect("fincore (util-linux)");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse::<u64>().ok())
        .sum()
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

fn main() {
    let node = Node::start();
    for (reference, layers) in [(ONE, 1), (DEEP, DEEP_LAYERS)] {
        let (tar, reference) = layered_image_tar(node.scratch_dir(), reference, layers);
        node.import_image(&tar, reference);
    }

    println!("container start, CreateContainer to its first output:");
    println!("  image      | use    | runc     | peapod   | peapod / runc");
    let mut rows = Vec::new();
    for handler in ["", PEAPOD_HANDLER] {
        let pod = node.run_pod(&format!("start-{}", handler.len()), handler);
        for (image, label) in [(ONE, "1 layer"), (DEEP, "40 layers")] {
            for (n, use_) in ["first", "second"].iter().enumerate() {
                let name = format!("c{}-{n}", label.len());
                let t = start(&node, &pod, image, &name);
                eprintln!(
                    "{}: {label}, {use_}: {t:.2?}",
                    if handler.is_empty() { "runc" } else { "peapod" }
                );
                rows.push((label, *use_, handler.is_empty(), t));
            }
        }
        node.remove_pod(&pod);
    }
    for (label, use_) in [
        ("1 layer", "first"),
        ("1 layer", "second"),
        ("40 layers", "first"),
        ("40 layers", "second"),
    ] {
        let find = |runc: bool| {
            rows.iter()
                .find(|r| r.0 == label && r.1 == use_ && r.2 == runc)
                .unwrap()
                .3
        };
        let (runc, peapod) = (find(true), find(false));
        println!(
            "  {label:10} | {use_:6} | {runc:8.2?} | {peapod:8.2?} | {:.1}",
            peapod.as_secs_f64() / runc.as_secs_f64()
        );
    }

    println!("\ntwo idle peapod pods, layer images in the host's page cache and VMM PSS:");
    for (label, images) in [
        ("same image", [ONE, ONE]),
        ("different images", [ONE, DEEP]),
    ] {
        evict(&node);
        let pods: Vec<Pod> = images
            .iter()
            .enumerate()
            .map(|(i, image)| {
                let pod = node.run_pod(&format!("idle-{}-{i}", label.len()), PEAPOD_HANDLER);
                start(&node, &pod, image, "idle");
                pod
            })
            .collect();
        std::thread::sleep(Duration::from_secs(5));
        let host = HostState::take(&node.host_filter());
        let vmm_pss: u64 = host.pids_named(VMM).iter().map(|p| pss_kib(*p) << 10).sum();
        println!(
            "  {label:16}: layer images {:7.2} MiB in the page cache, VMMs' PSS {:7.2} MiB",
            mib(cached_bytes(&node)),
            mib(vmm_pss)
        );
        for pod in &pods {
            node.remove_pod(pod);
        }
    }
    node.finish();
}
