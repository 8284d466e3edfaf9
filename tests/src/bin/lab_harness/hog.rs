//! Memory hogs: fill one node's memory before the VMs start, so a scenario can
//! prove that a balancer neither moves memory onto a full node nor sets off the OOM
//! killer.
//!
//! A hog is this same program started again with `--hog NODE:LEAVE_MIB`: it binds
//! its memory policy to NODE (set_mempolicy MPOL_BIND), then maps and touches
//! anonymous memory in steps until the node's MemFree (its sysfs meminfo) is at most
//! LEAVE_MIB, writes its ready file and sleeps. It is not a qemu process, so no
//! balancer mistakes it for a VM.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use vmbalancer_tests::lab::protocol::Record;
use vmbalancer_tests::lab::scenario::Hog;

use crate::emit;

const MPOL_BIND: i32 = 2;
const STEP_BYTES: u64 = 16 << 20;
const PAGE_BYTES: u64 = 4096;

/// A node's free memory from `/sys/devices/system/node/nodeN/meminfo`, through the
/// balancer's one reader of that file.
pub fn node_free_bytes(node: u32) -> anyhow::Result<u64> {
    Ok(balancer::host::linux::topology::read_node_meminfo(Path::new("/sys"), node)?.free_bytes)
}

/// The hog process itself: never returns while it holds the memory.
pub fn run(spec: &str, ready: &Path) -> anyhow::Result<()> {
    let (node, leave_mib) = spec
        .split_once(':')
        .and_then(|(n, l)| Some((n.parse::<u32>().ok()?, l.parse::<u64>().ok()?)))
        .with_context(|| format!("--hog wants NODE:LEAVE_MIB, got {spec:?}"))?;
    if node >= 64 {
        bail!("node {node} out of range");
    }
    let mask: u64 = 1 << node;
    // SAFETY: the mask outlives the call and maxnode matches its size in bits.
    let r = unsafe {
        libc::syscall(
            libc::SYS_set_mempolicy,
            MPOL_BIND,
            &mask as *const u64,
            64 as libc::c_ulong,
        )
    };
    if r != 0 {
        bail!(
            "set_mempolicy(BIND, {node}): {}",
            std::io::Error::last_os_error()
        );
    }
    let leave = leave_mib << 20;
    let mut held = 0u64;
    loop {
        let free = node_free_bytes(node)?;
        if free <= leave + PAGE_BYTES {
            break;
        }
        let step = STEP_BYTES.min(free - leave) / PAGE_BYTES * PAGE_BYTES;
        if step == 0 {
            break;
        }
        // SAFETY: a fresh private anonymous mapping; it is never unmapped (the hog
        // holds it until it is killed).
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                step as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            bail!("mmap of {step} bytes: {}", std::io::Error::last_os_error());
        }
        for off in (0..step).step_by(PAGE_BYTES as usize) {
            // SAFETY: `off` is within the mapping just created.
            unsafe { std::ptr::write_volatile((p as *mut u8).add(off as usize), 1) };
        }
        held += step;
    }
    std::fs::write(
        ready,
        format!(
            "{held} bytes held on node {node}, {} bytes free",
            node_free_bytes(node)?
        ),
    )?;
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Started hogs; dropped (killed) at the end of the run.
pub struct Hogs(Vec<Child>);

impl Drop for Hogs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts every hog and waits until each filled its node.
pub fn start_all(hogs: &[Hog]) -> anyhow::Result<Hogs> {
    let exe = std::env::current_exe().context("finding the harness executable")?;
    let mut out = Hogs(Vec::new());
    for h in hogs {
        let ready = PathBuf::from(format!("/run/lab/hog{}.ready", h.node));
        let _ = std::fs::remove_file(&ready);
        let start = Instant::now();
        let mut child = Command::new(&exe)
            .arg("--hog")
            .arg(format!("{}:{}", h.node, h.leave_free_mib))
            .arg("--hog-ready")
            .arg(&ready)
            .stdin(Stdio::null())
            .spawn()
            .context("starting a memory hog")?;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                bail!("memory hog for node {} exited: {status}", h.node);
            }
            if let Ok(text) = std::fs::read_to_string(&ready) {
                emit(&Record::Event {
                    source: "harness".into(),
                    text: format!(
                        "hog ready in {:.1} s: {text}",
                        start.elapsed().as_secs_f64()
                    ),
                });
                break;
            }
            if start.elapsed() > Duration::from_secs(180) {
                let _ = child.kill();
                bail!("memory hog for node {} did not fill it in 180 s", h.node);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        out.0.push(child);
    }
    Ok(out)
}
